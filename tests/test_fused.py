"""The compiled merge steps (``dymu.engine.fused``) against the naive reference, and what
happens where compiling fails. Compiled here by inductor's CPU backend, as a GPU's by Triton."""

import logging

import pytest
import torch
from naive import naive_encode
from test_encoder import calibrated, encoder, pixels  # noqa: F401 - fixtures

import dymu
from dymu.engine import fused


@pytest.mark.parametrize("lag", [0, 2])
def test_fused_threshold_merging_equals_the_naive_reference(encoder, pixels, calibrated, lag):  # noqa: F811
    """One compiled step per merge, images of different lengths in one batch, dead rows kept
    for ``lag`` blocks: the naive reference's tokens, sizes and groups."""
    taus = calibrated.thresholds.tolist()
    encoder.read_lag, encoder.fuse = lag, True
    try:
        with torch.no_grad():
            out = encoder(pixels)
    finally:
        encoder.read_lag, encoder.fuse = None, None
    assert all(
        fused.steps_for(fused.StepConfig(1, False, False), w).threshold.failed is None
        for w in (0, 1)
    )
    xs, sizes, groups, _ = naive_encode(encoder.tower.visual, pixels, encoder.r, taus)
    assert out.lengths.tolist() == [x.shape[0] for x in xs]
    assert len(set(out.lengths.tolist())) > 1
    for b, tokens in enumerate(out.to_list()):
        assert torch.allclose(tokens, xs[b], atol=1e-4)
        assert out.sizes[b, : len(sizes[b])].tolist() == sizes[b]
        assert out.groups[b].tolist() == groups[b]


def test_every_kind_of_batch_fits_within_dynamos_recompile_limit(encoder, pixels, calibrated):  # noqa: F811
    """One image, images of one length, of different lengths, the first merge, odd and even
    widths: compiled versions of each step stay within dynamo's limit (past it, dynamo would
    quietly run the step eagerly)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    encoder.fuse = True
    try:
        with torch.no_grad():
            for batch in (pixels[:1], pixels[1:2], pixels[:2], pixels, pixels[:1]):
                encoder(batch)
    finally:
        encoder.fuse = None
    steps = [fused.steps_for(fused.StepConfig(1, False, False), w).threshold for w in (0, 1)]
    compiled = [len(_debug_get_cache_entry_list(s.fn.__code__)) for s in steps]
    assert all(0 < n <= torch._dynamo.config.recompile_limit for n in compiled), compiled


def test_fused_merging_on_a_tower_without_a_class_token(photos):
    """SigLIP reorders every image at every merge (no prefix tokens): compiled as eager."""
    from towers import build

    enc = dymu.build_encoder(build("open_clip SigLIP"))
    pix = torch.stack([enc.preprocess(p) for p in photos[:5]])
    enc.set_thresholds(dymu.find_thresholds(enc, [pix[:3], pix[3:]]))
    with torch.no_grad():
        eager = enc(pix)
        enc.fuse = True
        compiled = enc(pix)
    assert len(set(eager.lengths.tolist())) > 1
    assert torch.equal(eager.lengths, compiled.lengths)
    assert torch.equal(eager.groups, compiled.groups)
    assert torch.allclose(eager.tokens, compiled.tokens, atol=1e-5)


def test_a_step_that_does_not_compile_runs_eagerly_and_says_so(monkeypatch, caplog):
    """Any compiler failure (an old torch, no C++ compiler) falls back to the eager step,
    with one warning, and later calls do not try again."""
    tries = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            tries.append(1)
            raise RuntimeError("no compiler here\nmore detail")

        return run

    monkeypatch.setattr(fused.torch, "compile", broken_compile)
    step = fused.FusedStep(fused.fixed_step)
    torch.manual_seed(0)
    x, keys = torch.randn(2 * 9, 8), torch.randn(2 * 9, 1, 2, 4)
    args = (
        x,
        None,
        keys,
        None,
        torch.tensor([9, 9]),
        2,
        9,
        3,
        fused.StepConfig(1, False, False),
    )
    with caplog.at_level(logging.WARNING, logger="dymu.engine.fused"):
        first = step(*args)
        second = step(*args)
    want = fused.fixed_step(*args)
    for got in (first, second):
        assert torch.equal(got[0], want[0]) and got[2].tolist() == [6, 6]
    assert len(tries) == 1 and step.failed == "RuntimeError: no compiler here"
    assert [r.getMessage() for r in caplog.records] == [
        "the fused merge step did not compile (RuntimeError: no compiler here); merging eagerly"
    ]


def test_running_out_of_memory_is_not_a_compiler_failure(monkeypatch):
    """An out-of-memory error inside the compiled step reaches the caller, and the step
    stays compiled (eager would not fit either)."""

    def out_of_memory(fn, **kwargs):
        def run(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        return run

    monkeypatch.setattr(fused.torch, "compile", out_of_memory)
    step = fused.FusedStep(fused.fixed_step)
    x, keys = torch.randn(9, 8), torch.randn(9, 1, 2, 4)
    args = (x, None, keys, None, torch.tensor([9]), 1, 9, 3, fused.StepConfig(1, False, False))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        step(*args)
    assert step.failed is None


def test_an_encoder_that_ran_compiled_pickles_and_copies(encoder, pixels, calibrated):  # noqa: F811
    """Its rules are made again after ``torch.save`` of the whole module or
    ``copy.deepcopy``, and it runs compiled after as before."""
    import copy
    import io

    encoder.fuse = True
    try:
        with torch.no_grad():
            want = encoder(pixels[:2])
        buffer = io.BytesIO()
        torch.save(encoder, buffer)
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        for other in (loaded, copy.deepcopy(encoder)):
            with torch.no_grad():
                got = other(pixels[:2])
            assert torch.equal(got.groups, want.groups)
            assert torch.allclose(got.tokens, want.tokens, atol=1e-6)
    finally:
        encoder.fuse = None
