"""DyMU in Qwen2-VL and Qwen2.5-VL: the tower against the unmodified tower and a naive
per-window loop, the model against the unmodified model, the VTU mapping against a trace of
the model's own placement, greedy decoding against naive full-length VTU, and
``dymu.apply`` / ``dymu.remove``."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from naive_qwen import naive_qwen
from naive_vtu import naive_logits
from qwen_vlms import FAMILIES, IMAGE, VIDEO, build, pixels, prompts, token_types, units

import dymu
from dymu import DyMUError, Thresholds
from dymu.calibration.loop import find_thresholds
from dymu.encoder.qwen import QwenDyMUEncoder, expand_units
from dymu.engine.fused import StepConfig, steps_for
from dymu.integrations import hf_qwen_vl

IMAGES = [(1, 8, 12), (1, 4, 8), (1, 6, 4)]


def calibrated(model, inputs: dict, r: int = 2, margin: float = 0.05) -> Thresholds:
    """Thresholds from one calibration batch, raised by ``margin`` (so some pairs merge and
    some do not)."""
    encoder = hf_qwen_vl.build_encoder(model, r_total=r * len(model.model.visual.blocks))
    with torch.no_grad():
        _, values, used = encoder.calibrate(inputs)
    return Thresholds(
        values + margin, used.long(), torch.tensor(encoder.r), encoder.identity.metadata()
    )


def never(model) -> Thresholds:
    encoder = hf_qwen_vl.build_encoder(model, r_total=len(model.model.visual.blocks))
    r = torch.tensor(encoder.r)
    return Thresholds.from_values(torch.ones(len(r)), r, encoder.identity.metadata())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return build(family)


def test_unmerged_encoder_is_the_tower(model):
    pix, grid = pixels([*IMAGES, (2, 4, 6)])  # three images and a two-step video
    visual = model.model.visual
    encoder = QwenDyMUEncoder(visual, [0] * len(visual.blocks))
    with torch.no_grad():
        expected = visual(pix, grid_thw=grid)
        out = encoder(pix, grid)
    assert out.host_lengths == (24, 8, 6, 6, 6)  # one row per frame: the video's two steps
    torch.testing.assert_close(expand_units(out), expected.pooler_output, atol=1e-5, rtol=1e-5)
    stacked = getattr(expected, "deepstack_features", None) or []  # Qwen3-VL's DeepStack
    assert len(out.features) == len(stacked)
    for head, rows in zip(out.features, stacked, strict=True):
        torch.testing.assert_close(expand_units(head), rows, atol=1e-5, rtol=1e-5)


def test_a_patch_embedding_that_is_not_a_plain_conv_runs_as_it_is(model):
    """The encoder computes the Conv3d patch embedding as one matrix product; another module
    in its place (here a wrapper scaling its output) is called as the tower would call it."""

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    visual = model.model.visual
    pix, grid = pixels(IMAGES[:2])
    original = visual.patch_embed
    visual.patch_embed = Scaled(original)
    try:
        encoder = QwenDyMUEncoder(visual, [0] * len(visual.blocks))
        with torch.no_grad():
            expected = visual(pix, grid_thw=grid).pooler_output
            got = expand_units(encoder(pix, grid))
    finally:
        visual.patch_embed = original
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["keep", "unmerge"])
def test_encoder_matches_naive_loop(model, positions):
    pix, grid = pixels([*IMAGES, (2, 4, 6)])
    thresholds = calibrated(model, {"pixel_values": pix, "image_grid_thw": grid})
    encoder = hf_qwen_vl.build_encoder(model, thresholds)
    encoder.positions = positions
    with torch.no_grad():
        out = encoder(pix, grid)
    taus = thresholds.merging_blocks()
    expected, deepstack = naive_qwen(model.model.visual, pix, grid, taus, positions == "unmerge")
    assert sum(out.host_lengths) < sum(len(g) for _, g in expected)  # something merged
    assert len(out.features) == len(deepstack)  # Qwen3-VL: one per DeepStack block
    for head, naive in zip(out.features, deepstack, strict=True):
        _same(head, naive)
    _same(out, expected)


def test_fused_merges_match_naive_loop(model):
    """Merges as one compiled step each (``dymu.engine.fused``), windows as its images and
    the rotary tables carried, with dead units kept for two blocks: the naive loop's tokens,
    groups and DeepStack outputs."""
    pix, grid = pixels([*IMAGES, (2, 4, 6)])
    thresholds = calibrated(model, {"pixel_values": pix, "image_grid_thw": grid})
    encoder = hf_qwen_vl.build_encoder(model, thresholds)
    encoder.fuse, encoder.read_lag = True, 2
    with torch.no_grad():
        out = encoder(pix, grid)
    assert all(steps_for(StepConfig(0, False, True), w).threshold.failed is None for w in (0, 1))
    expected, deepstack = naive_qwen(model.model.visual, pix, grid, thresholds.merging_blocks())
    assert sum(out.host_lengths) < sum(len(g) for _, g in expected)  # something merged
    for head, naive in zip(out.features, deepstack, strict=True):
        _same(head, naive)
    _same(out, expected)


def test_calibration_reads_lengths_later_too(model):
    """The batch rule with lengths read three blocks after each merge (its count, cap and
    last rank taken on the device): the thresholds of reading them at once."""
    pix, grid = pixels([*IMAGES, (2, 4, 6)])
    encoder = hf_qwen_vl.build_encoder(model, r_total=5 * len(model.model.visual.blocks))
    found = []
    for lag in (0, 3):
        encoder.read_lag = lag
        with torch.no_grad():
            found.append(encoder.calibrate({"pixel_values": pix, "image_grid_thw": grid}))
    (now, values, used), (later, values_later, used_later) = found
    assert torch.equal(used, used_later) and used.any()
    torch.testing.assert_close(values, values_later, atol=1e-6, rtol=0)
    assert now.host_lengths == later.host_lengths and torch.equal(now.groups, later.groups)


def test_every_read_lag_gives_the_same_output(model):
    """Lengths read 0, 1 or 3 blocks after a merge (dead units kept meanwhile) change
    nothing: tokens, groups, per-block counts, DeepStack outputs."""
    pix, grid = pixels([*IMAGES, (2, 4, 6)])
    thresholds = calibrated(model, {"pixel_values": pix, "image_grid_thw": grid})
    encoder = hf_qwen_vl.build_encoder(model, thresholds)
    outs = []
    for lag in (0, 1, 3):
        encoder.read_lag = lag
        with torch.no_grad():
            outs.append(encoder(pix, grid))
    first = outs[0]
    assert sum(first.host_lengths) < sum(first.host_inputs)  # something merged
    for out in outs[1:]:
        assert out.host_lengths == first.host_lengths
        assert torch.equal(out.groups, first.groups)
        assert torch.equal(out.block_lengths, first.block_lengths)
        torch.testing.assert_close(out.tokens, first.tokens, atol=1e-5, rtol=1e-5)
        for head, head0 in zip(out.features, first.features, strict=True):
            torch.testing.assert_close(head.tokens, head0.tokens, atol=1e-5, rtol=1e-5)


def _same(out, expected) -> None:
    """An encoder output equals the naive loop's (tokens, groups) per frame."""
    for frame, (tokens, groups) in enumerate(expected):
        assert out.host_lengths[frame] == tokens.shape[0]
        torch.testing.assert_close(
            out.tokens[frame, : tokens.shape[0]], tokens, atol=1e-5, rtol=1e-5
        )
        assert out.groups[frame, : len(groups)].tolist() == groups
        assert (out.groups[frame, len(groups) :] == -1).all()


def test_find_thresholds_on_processor_batches(model, tmp_path):
    batches = [
        {"pixel_values": p, "image_grid_thw": g}
        for p, g in (pixels(IMAGES, 1), pixels(IMAGES[:1], 2))
    ]
    encoder = hf_qwen_vl.build_encoder(model, r_total=2 * len(model.model.visual.blocks))
    found = find_thresholds(encoder, batches)
    assert found.count[0] == 2 and found.metadata["images"] == "4"
    found.save(tmp_path / "t.safetensors")
    merged = hf_qwen_vl.build_encoder(model, tmp_path / "t.safetensors")
    with torch.no_grad():
        assert sum(merged(*pixels(IMAGES)).host_lengths) < 24 + 8 + 6
    other = build("qwen2_vl" if "Qwen2_5" in type(model).__name__ else "qwen2_5_vl")
    with pytest.raises(DyMUError):
        hf_qwen_vl.build_encoder(other, found)


def _case(name: str, model=None):
    """Model inputs: two images in one prompt, a left-padded batch of two, a video (Qwen3-VL
    puts each temporal patch of a video between its own start and end tokens)."""
    if name == "two_images":
        pix, grid = pixels(IMAGES[:2])
        rows = [[("text", 3), ("image", 24), ("text", 2), ("image", 8), ("text", 2)]]
    elif name == "batch":
        pix, grid = pixels([IMAGES[0], IMAGES[2]])
        rows = [[("text", 2), ("image", 24), ("text", 3)], [("image", 6), ("text", 4)]]
    else:
        pix, grid = pixels([(2, 4, 8)])
        if "Qwen3" in type(model).__name__:
            video = [("video", units((1, 4, 8))), ("text", 1), ("video", units((1, 4, 8)))]
        else:
            video = [("video", units((2, 4, 8)))]
        rows = [[("text", 2), *video, ("text", 3)]]
    ids, mask = prompts(rows)
    kind = "video" if name == "video" else "image"
    pixel_arg = "pixel_values_videos" if kind == "video" else "pixel_values"
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": token_types(ids),
        pixel_arg: pix,
        f"{kind}_grid_thw": grid,
    }


@pytest.mark.parametrize("case", ["two_images", "batch", "video"])
def test_nothing_merged_is_the_model(model, case):
    inputs = _case(case, model)
    with torch.no_grad():
        expected = model(**inputs).logits
        dymu.apply(model, thresholds=never(model), vtu=True)
        try:
            got = model(**inputs).logits
        finally:
            dymu.remove(model)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _trace_units(model, inputs: dict) -> torch.Tensor:
    """Which visual row the unmodified model puts at each prompt position: the tower's
    output replaced by row numbers, read back at the language model's input (-1: text)."""
    visual, lm = model.model.visual, model.model.language_model
    seen = {}

    def numbered(module, args, kwargs, output):
        rows = output.pooler_output
        output.pooler_output = torch.arange(rows.shape[0]).float()[:, None].expand_as(rows)
        return output

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handles = [
        visual.register_forward_hook(numbered, with_kwargs=True),
        lm.register_forward_pre_hook(record, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    ids = inputs["input_ids"]
    placeholder = (ids == IMAGE) | (ids == VIDEO)
    return torch.where(placeholder, seen["embeds"][..., 0].round().long(), -1)


def _expected_mapping(trace, ids, outputs: dict) -> list[list[int]]:
    """Per sample: a placeholder takes its unit's merged token (frame, group); others and
    text get their own slots; slots numbered by first appearance."""
    keys = {}
    for modality, out in outputs.items():
        flat = [
            (modality, f, g)
            for f in range(len(out.host_lengths))
            for g in out.groups[f].tolist()
            if g >= 0
        ]
        keys[modality] = flat
    mapping = []
    for b in range(ids.shape[0]):
        slots: dict = {}
        row = []
        for p in range(ids.shape[1]):
            token = int(ids[b, p])
            if token in (IMAGE, VIDEO):
                key = keys["image" if token == IMAGE else "video"][int(trace[b, p])]
            else:
                key = ("own", p)
            row.append(slots.setdefault(key, len(slots)))
        mapping.append(row)
    return mapping


@pytest.mark.parametrize("case", ["batch", "video"])
def test_mapping_matches_a_trace_of_the_model(model, case):
    inputs = _case(case, model)
    trace = _trace_units(model, inputs)
    thresholds = calibrated(model, {k: v for k, v in inputs.items() if "grid" in k or "pixel" in k})
    encoder = hf_qwen_vl.build_encoder(model, thresholds)
    modality = "video" if case == "video" else "image"
    pix = inputs["pixel_values_videos" if case == "video" else "pixel_values"]
    grid = inputs["video_grid_thw" if case == "video" else "image_grid_thw"]
    with torch.no_grad():
        outputs = {modality: encoder(pix, grid)}
    seen = {}
    lm = model.model.language_model

    def record(module, args, kwargs):
        seen["mapping"] = kwargs.get("vtu_mapping")

    handle = lm.register_forward_pre_hook(record, with_kwargs=True)  # before VTU's own hooks
    dymu.apply(model, thresholds=thresholds)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        dymu.remove(model)
        handle.remove()
    mapping = seen["mapping"]
    assert int(mapping.max()) + 1 < mapping.shape[1]  # merged tokens share slots
    assert mapping.tolist() == _expected_mapping(trace, inputs["input_ids"], outputs)


def _record_lm_inputs(model):
    """A pre-hook on the language model keeping each call's embeddings and positions."""
    calls = []

    def record(module, args, kwargs):
        names = ("inputs_embeds", "position_ids", "vtu_mapping", "visual_pos_masks")
        calls.append({k: kwargs.get(k) for k in (*names, "deepstack_visual_embeds")})

    return calls, model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)


def test_greedy_generate_with_vtu_is_naive_full_length_vtu(model):
    inputs = _case("batch", model)
    thresholds = calibrated(
        model, {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    )
    steps = 4
    calls, handle = _record_lm_inputs(model)
    dymu.apply(model, thresholds=thresholds, vtu=True)
    try:
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    finally:
        dymu.remove(model)
        handle.remove()
    prefill, decode = calls[0], calls[1:]
    mapping = prefill["vtu_mapping"]
    assert int(mapping.max()) + 1 < mapping.shape[1]
    # the naive computation: full-length prompt embeddings (merged tokens repeated over their
    # units, as the model built them), the model's own 3D positions, loops for the groups
    lm, head = model.model.language_model, model.lm_head
    seq, positions = prefill["inputs_embeds"], prefill["position_ids"]
    positions = positions[-3:] if positions.shape[0] == 4 else positions
    seq_map, mask = mapping, inputs["attention_mask"]
    visual, rows = prefill["visual_pos_masks"], prefill["deepstack_visual_embeds"]
    stack = None if rows is None else (visual, rows)  # Qwen3-VL's DeepStack
    tokens = []
    with torch.no_grad():
        for step in range(steps):
            logits = naive_logits(lm, head, seq, seq_map, mask, positions, stack)
            nxt = logits[:, -1].argmax(-1)
            tokens.append(nxt)
            if step + 1 == steps:
                break
            seq = torch.cat([seq, model.get_input_embeddings()(nxt)[:, None]], 1)
            fresh = seq_map.max(1, keepdim=True).values + 1
            seq_map = torch.cat([seq_map, fresh], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step_pos = decode[step]["position_ids"]
            step_pos = step_pos[-3:] if step_pos.shape[0] == 4 else step_pos
            positions = torch.cat([positions, step_pos], -1)
    assert generated[:, -steps:].tolist() == torch.stack(tokens, 1).tolist()


def test_remove_restores_exactly(model):
    vlm = model.model
    before_outer, before_inner = dict(model.__dict__), dict(vlm.__dict__)
    before_lm = [dict(layer.self_attn.__dict__) for layer in vlm.language_model.layers]

    def wrapper(*args, **kwargs):  # someone else's instance patch
        return type(vlm).get_image_features(vlm, *args, **kwargs)

    vlm.get_image_features = wrapper
    dymu.apply(model, thresholds=never(model))
    assert dymu.apply(model, thresholds=never(model)) is model  # idempotent
    assert hf_qwen_vl.encoder_of(model) is not None
    dymu.remove(model)
    assert vlm.__dict__.pop("get_image_features") is wrapper
    assert model.__dict__ == before_outer and vlm.__dict__ == before_inner
    assert [dict(layer.self_attn.__dict__) for layer in vlm.language_model.layers] == before_lm
    assert not vlm.language_model._forward_pre_hooks and not vlm.language_model._forward_hooks


def test_apply_refuses_other_classes_in_one_line():
    with pytest.raises(DyMUError) as err:
        dymu.apply(torch.nn.Linear(2, 2), thresholds=None)
    message = str(err.value)
    assert "\n" not in message and "Linear" in message
    assert (
        "Qwen2_5_VLForConditionalGeneration" in message
        and "LlavaForConditionalGeneration" in message
    )
    with pytest.raises(DyMUError):
        dymu.remove(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", FAMILIES)
def test_find_thresholds_cli_on_a_model_folder(name, tmp_path, photo_dir):
    """``dymu-find-thresholds --hf-model`` on a saved Qwen-VL: the folder's own image
    processor at dynamic resolution, batches of different patch counts, a file the model
    then takes."""
    from conftest import run_cli
    from transformers import Qwen2VLImageProcessor

    folder = tmp_path / name
    model = build(name)
    model.save_pretrained(folder)
    Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, max_pixels=60000
    ).save_pretrained(folder)
    out = tmp_path / "t.safetensors"
    proc = run_cli(
        [
            "--data",
            photo_dir / "images.json",
            "--hf-model",
            folder,
            "--batch-size",
            3,
            "--out",
            out,
        ],
        tmp_path,
    )
    assert "LLM tokens per frame" in proc.stdout
    found = Thresholds.load(out)
    images = int(found.metadata["images"])
    listed = len(json.loads((photo_dir / "images.json").read_text()))
    assert images == listed and found.count[0] > 0
    dymu.apply(model, thresholds=out)  # made for this tower: accepted
    dymu.remove(model)
    # dymu-encode on the same folder: token counts per photo and pictures of the groups
    photo = photo_dir / "img" / "coffee.jpg"
    cmd = [shutil.which("dymu-encode"), photo, "--hf-model", folder, "--thresholds", out]
    cmd += ["--show", tmp_path / "show", "--per-block"]
    shown = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "tokens" in shown.stdout and "per block" in shown.stdout
    assert (tmp_path / "show" / "coffee.dymu.png").is_file()


def test_batches_of_flat_patch_runs_concatenate():
    from dymu.sources.stream import Batch, stack_inputs

    items = [
        {"pixel_values": torch.ones(n, 5), "image_grid_thw": torch.tensor([[1, 2, n // 2]])}
        for n in (4, 8)
    ]
    batch = stack_inputs(items)
    assert batch["pixel_values"].shape == (12, 5) and batch["image_grid_thw"].shape == (2, 3)
    assert Batch(0, batch, []).size == 2


def test_beam_search_with_nothing_merged_is_the_model(model):
    """generate() expands the inputs (and the VTU mapping) per beam: with nothing merged the
    sequences equal the unmodified model's."""
    inputs = _case("batch", model)
    beams = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**inputs, **beams)
        dymu.apply(model, thresholds=never(model))
        try:
            got = model.generate(**inputs, **beams)
        finally:
            dymu.remove(model)
    assert torch.equal(got, expected)
