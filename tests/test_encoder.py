"""DyMUEncoder against vanilla open_clip and against the naive reference in ``naive.py``."""

import pytest
import torch
from conftest import TINY, checkerboard, noise
from naive import naive_encode

import dymu
from dymu import Thresholds

NAME = f"{TINY}-tome"


@pytest.fixture(scope="module")
def encoder():
    return dymu.build_encoder(f"{NAME}-24out")  # 64 patches -> 24 kept on average


@pytest.fixture(scope="module")
def pixels(encoder, photos):
    return torch.stack([encoder.preprocess(p) for p in photos])


@pytest.fixture(scope="module")
def calibrated(encoder, pixels):
    th = dymu.find_thresholds(encoder, [pixels[:4], pixels[4:8], pixels[8:]])
    encoder.set_thresholds(th)
    return th


def vanilla_hidden_states(visual, x):
    h = visual._embeds(x)
    states = [h]
    for blk in visual.transformer.resblocks:
        h = blk(h)
        states.append(h)
    return states


@pytest.mark.parametrize("how", ["r_total=0", "thresholds>=1"])
def test_no_merging_equals_vanilla_open_clip(pixels, how):
    if how == "r_total=0":
        enc = dymu.load_encoder(NAME, r_total=0)
    else:
        enc = dymu.build_encoder(NAME)
        blocks = enc.tower.num_blocks
        values = torch.tensor([1.0, 1.5, float("inf"), 1.0])[:blocks]
        enc.set_thresholds(Thresholds.from_values(values, torch.tensor(enc.r), {"model": NAME}))
    visual = enc.tower.visual
    with torch.no_grad():
        out = enc(pixels)
        tokens = vanilla_hidden_states(visual, pixels)[-1]
        pooled = visual(pixels)
    assert out.lengths.tolist() == [65] * len(pixels)
    assert torch.allclose(out.tokens, tokens, atol=1e-5)
    assert torch.allclose(out.pooled, pooled, atol=1e-5)
    assert out.groups.tolist() == [list(range(65))] * len(pixels)


def test_select_layer_and_drop_cls_match_hidden_states(pixels):
    enc = dymu.build_encoder(NAME, r_total=0, select_layer=-2, drop_cls=True)
    with torch.no_grad():
        out = enc(pixels)
        states = vanilla_hidden_states(enc.tower.visual, pixels)
    assert enc.num_run == 3 and out.pooled is None
    assert torch.allclose(out.tokens, states[-2][:, 1:], atol=1e-5)
    assert out.lengths.tolist() == [64] * len(pixels)
    assert out.groups[0].tolist() == list(range(64))


def test_calibration_matches_naive_reference(encoder, pixels, calibrated):
    batches = [pixels[:4], pixels[4:8], pixels[8:]]
    sums = torch.zeros(encoder.tower.num_blocks, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            _, _, _, found = naive_encode(encoder.tower.visual, batch, encoder.r, None)
            sums += torch.tensor(found, dtype=torch.float64)
    assert calibrated.count.tolist() == [3] * encoder.tower.num_blocks
    assert torch.allclose(calibrated.thresholds.double(), sums / 3, atol=1e-5)


def test_inference_matches_naive_reference(encoder, pixels, calibrated):
    taus = calibrated.thresholds.tolist()
    with torch.no_grad():
        out = encoder(pixels)
        xs, sizes, groups, _ = naive_encode(encoder.tower.visual, pixels, encoder.r, taus)
    assert out.lengths.tolist() == [x.shape[0] for x in xs]
    assert len(set(out.lengths.tolist())) > 1  # the photos really get different counts
    for b, tokens in enumerate(out.to_list()):
        assert torch.allclose(tokens, xs[b], atol=1e-4)
        assert out.sizes[b, : len(sizes[b])].tolist() == sizes[b]
        assert out.groups[b].tolist() == groups[b]


def test_batch_invariance(encoder, pixels, calibrated):
    batch = pixels[:8]
    with torch.no_grad():
        together = encoder(batch)
        alone = [encoder(batch[i : i + 1]) for i in range(8)]
    assert together.lengths.tolist() == [int(o.lengths[0]) for o in alone]
    for i, o in enumerate(alone):
        assert torch.allclose(together.to_list()[i], o.to_list()[0], atol=1e-5)
        assert torch.allclose(together.pooled[i], o.pooled[0], atol=1e-5)
        assert torch.equal(together.groups[i], o.groups[0])


def test_sizes_and_groups_account_for_every_token(encoder, pixels, calibrated):
    with torch.no_grad():
        out = encoder(pixels)
    n0 = 65
    assert torch.allclose(out.sizes.sum(1), torch.full((len(pixels),), float(n0)))
    for b in range(len(pixels)):
        n = int(out.lengths[b])
        assert (out.sizes[b, n:] == 0).all()
        counts = torch.bincount(out.groups[b], minlength=n).float()
        assert torch.equal(counts, out.sizes[b, :n])


def test_repetitive_image_gets_fewer_tokens_than_noise(encoder, calibrated):
    images = torch.stack([encoder.preprocess(checkerboard()), encoder.preprocess(noise())])
    with torch.no_grad():
        board, rand = encoder(images).lengths.tolist()
    assert board < rand


def test_low_precision_runs_and_accounts(encoder, pixels, calibrated):
    enc = dymu.build_encoder(f"{NAME}-24out", dtype=torch.bfloat16)
    enc.set_thresholds(calibrated)
    with torch.no_grad():
        out = enc(pixels)
    assert out.tokens.dtype == torch.bfloat16 and out.sizes.dtype == torch.float32
    assert torch.allclose(out.sizes.sum(1), torch.full((len(pixels),), 65.0))
    assert torch.isfinite(out.tokens.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_images_tokens_do_not_depend_on_its_batch_in_any_precision(pixels, calibrated, dtype):
    """Decisions compare float32 scores with float32 thresholds, so a half-precision tower
    gives each photo the same groups alone, in batches of 3 and in a batch of all 11."""
    enc = dymu.build_encoder(f"{NAME}-24out", dtype=dtype)
    enc.set_thresholds(calibrated)
    with torch.no_grad():
        everything = enc(pixels.to(dtype))
        threes = [enc(pixels[i : i + 3].to(dtype)) for i in range(0, len(pixels), 3)]
        alone = [enc(pixels[i : i + 1].to(dtype)) for i in range(len(pixels))]
    lengths = [int(o.lengths[0]) for o in alone]
    assert everything.lengths.tolist() == lengths
    assert torch.cat([t.lengths for t in threes]).tolist() == lengths
    groups = torch.cat([o.groups for o in alone])
    assert torch.equal(everything.groups, groups)
    assert torch.equal(torch.cat([t.groups for t in threes]), groups)
    assert len(set(lengths)) > 1  # merging happened, and differently per photo


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_calibration_finds_the_fp32_thresholds(pixels, calibrated, dtype):
    """Calibrating a bf16/fp16 tower gives fp32's thresholds to within its rounding.

    Bounds, in ulps of the format at the cosines thresholds sit at ([0.5, 1): eps / 2).
    Block 1 scores the same tokens in both runs: a score differs by its rounding to the
    format (half an ulp) and what the embedding and key projection carry, and the k-th
    largest of perturbed scores moves no more than the largest perturbation, so each batch
    threshold and their mean stay within 1 ulp. Later blocks see tokens whose merges may
    differ: 4 ulps. Measured on these photos: bf16 0.0015 (block 1, 0.4 ulp) and 0.0036
    (block 4, 0.9 ulp); fp16 1.4e-4 (0.3 ulp) at most.
    """
    low = dymu.build_encoder(f"{NAME}-24out", dtype=dtype)
    found = dymu.find_thresholds(low, [pixels[:4], pixels[4:8], pixels[8:]])
    assert found.metadata["dtype"] == {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    assert torch.equal(found.count, calibrated.count) and torch.equal(found.r, calibrated.r)
    ulp = torch.finfo(dtype).eps / 2  # bf16: 2^-8, fp16: 2^-11
    diff = (found.thresholds.double() - calibrated.thresholds.double()).abs()
    assert diff[0] < ulp, diff.tolist()
    assert diff.max() < 4 * ulp, diff.tolist()


def test_missing_thresholds_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DYMU_THRESHOLDS", str(tmp_path))
    with pytest.raises(dymu.DyMUError, match="dymu-find-thresholds"):
        dymu.load_encoder(NAME)
    (tmp_path / f"{NAME}.safetensors").write_bytes(b"")
    with pytest.raises(dymu.DyMUError, match="not a dymu thresholds file"):
        dymu.load_encoder(NAME)


def test_thresholds_found_by_name(monkeypatch, tmp_path, calibrated):
    monkeypatch.setenv("DYMU_THRESHOLDS", str(tmp_path))
    calibrated.save(tmp_path / f"{NAME}-24out.safetensors")
    enc = dymu.load_encoder(f"{NAME}-24out")
    assert torch.allclose(enc.thresholds.thresholds, calibrated.thresholds)


@pytest.mark.parametrize("lag", [1, 3])
def test_calibrating_with_lengths_read_blocks_later_changes_nothing(encoder, pixels, lag):
    """Calibration reads each merge's lengths ``read_lag`` blocks later too (the batch rule's
    count and cap are taken on the device): the same batch thresholds, lengths and groups
    as reading them at once."""
    batch = pixels[:6]
    outs = []
    for read_lag in (0, lag):
        encoder.read_lag = read_lag
        try:
            with torch.no_grad():
                outs.append(encoder.calibrate(batch, [40, 20, 10, 10]))  # caps bind late
        finally:
            encoder.read_lag = None
    (now, values, used), (later, values_later, used_later) = outs
    assert torch.equal(used, used_later)
    assert torch.allclose(values, values_later, atol=1e-6)  # scores of a wider view: rounding
    assert torch.equal(now.lengths, later.lengths) and torch.equal(now.groups, later.groups)
    assert now.block_lengths[:, -1].tolist() != now.block_lengths[:, 0].tolist()


@pytest.mark.parametrize("lag", [1, 2, 5])
def test_reading_lengths_blocks_later_changes_nothing(encoder, pixels, calibrated, lag):
    """Threshold merges may read their new lengths some blocks later (the segments carry dead
    rows until then): every lag gives the naive reference's tokens, sizes and groups."""
    taus = calibrated.thresholds.tolist()
    encoder.read_lag = lag
    try:
        with torch.no_grad():
            out = encoder(pixels)
    finally:
        encoder.read_lag = None
    xs, sizes, groups, _ = naive_encode(encoder.tower.visual, pixels, encoder.r, taus)
    assert out.lengths.tolist() == [x.shape[0] for x in xs]
    assert out.tokens.shape[1] == max(x.shape[0] for x in xs)  # compacted at the end
    for b, tokens in enumerate(out.to_list()):
        assert torch.allclose(tokens, xs[b], atol=1e-4)
        assert out.sizes[b, : len(sizes[b])].tolist() == sizes[b]
        assert out.groups[b].tolist() == groups[b]


@pytest.mark.parametrize("kind", ["open_clip SigLIP", "hf DINOv2 reg4"])
def test_reading_lengths_later_on_other_towers(photos, kind):
    """Towers without a class token (every image reordered at every merging block) and with
    register tokens: a lag of 2 gives what reading at once gives."""
    from towers import build

    enc = dymu.build_encoder(build(kind))
    pix = torch.stack([enc.preprocess(p) for p in photos[:6]])
    enc.set_thresholds(dymu.find_thresholds(enc, [pix[:3], pix[3:]]))
    with torch.no_grad():
        enc.read_lag = 0
        now = enc(pix)
        enc.read_lag = 2
        later = enc(pix)
    assert torch.equal(now.lengths, later.lengths) and torch.equal(now.groups, later.groups)
    assert len(set(now.lengths.tolist())) > 1
    assert torch.allclose(now.tokens, later.tokens, atol=1e-5)
    if now.pooled is not None:
        assert torch.allclose(now.pooled, later.pooled, atol=1e-5)
