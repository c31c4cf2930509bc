"""DyMU in Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: the model against the unmodified model,
the VTU mapping against a trace of the model's own placement, greedy decoding against naive
full-length VTU, and ``dymu.apply`` / ``dymu.remove`` (the towers alone:
``test_qwen_tower.py``)."""

from __future__ import annotations

import pytest
import torch
from naive_vtu import naive_logits
from qwen_vlms import FAMILIES, IMAGE, VIDEO, build, calibrated, case_inputs, never

import dymu
from dymu import DyMUError
from dymu.integrations import hf_qwen_vl


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return build(request.param)


@pytest.mark.parametrize("case", ["two_images", "batch", "video"])
def test_nothing_merged_is_the_model(model, case):
    inputs = case_inputs(case, model)
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
    inputs = case_inputs(case, model)
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
    inputs = case_inputs("batch", model)
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


def test_beam_search_with_nothing_merged_is_the_model(model):
    """generate() expands the inputs (and the VTU mapping) per beam: with nothing merged the
    sequences equal the unmodified model's."""
    inputs = case_inputs("batch", model)
    beams = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**inputs, **beams)
        dymu.apply(model, thresholds=never(model))
        try:
            got = model.generate(**inputs, **beams)
        finally:
            dymu.remove(model)
    assert torch.equal(got, expected)
