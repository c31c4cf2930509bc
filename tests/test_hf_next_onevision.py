"""DyMU in tiny transformers LLaVA-NeXT and LLaVA-OneVision models (AnyRes crops, unpadding,
newline tokens, anyres_max interpolation, multi-image prompts, video pooling)."""

import pytest
import torch
from conftest import checkerboard, noise
from hf_vlms import IMAGE, VIDEO, build, feature_counts, never_merge, pixels, prompts, video
from naive_vtu import naive_logits
from PIL import Image

import dymu
from dymu.integrations import hf_llava

FAMILIES = ["next", "onevision"]


def batch_of_two(family, photos):
    """Two prompts, images of different sizes (2 and 4 crops), left padding."""
    model = build(family)
    inputs = pixels(family, [photos[0].resize((60, 30)), photos[3].resize((40, 40))])
    counts, _ = feature_counts(model, inputs)
    ids, mask = prompts([[("text", 3), ("image", n), ("text", 2)] for n in counts])
    return model, dict(inputs, input_ids=ids, attention_mask=mask)


def multi_image(family, photos):
    """One prompt holding two images."""
    model = build(family)
    pictures = [photos[1].resize((50, 30)), photos[2].resize((30, 50))]
    inputs = pixels(family, pictures, one_prompt=True)
    a, b = feature_counts(model, inputs)[0]
    ids, mask = prompts([[("text", 2), ("image", a), ("text", 2), ("image", b), ("text", 1)]])
    return model, dict(inputs, input_ids=ids, attention_mask=mask)


def video_prompt(family, photos):
    """A OneVision prompt with a 3-frame video (2 x 2 pooling, one newline per video); a flat
    frame merges enough that whole pooling windows fall in one group."""
    model = build(family)
    flat = Image.new("RGB", (64, 64), (120, 140, 90))
    inputs = {"pixel_values_videos": video([flat, checkerboard(), photos[4]])}
    _, n = feature_counts(model, inputs)
    ids, mask = prompts([[("text", 2), ("video", n), ("text", 3)]])
    return model, dict(inputs, input_ids=ids, attention_mask=mask)


CASES = [
    ("next", batch_of_two),
    ("onevision", batch_of_two),
    ("next", multi_image),
    ("onevision", multi_image),
    ("onevision", video_prompt),
]
IDS = [f"{family}-{case.__name__}" for family, case in CASES]


@pytest.mark.parametrize("vtu", [True, False])
@pytest.mark.parametrize("family,case", CASES, ids=IDS)
def test_nothing_merged_equals_the_original_model(family, case, vtu, photos):
    model, inputs = case(family, photos)
    with torch.no_grad():
        plain = model(**inputs).logits
        hf_llava.apply(model, never_merge(), vtu=vtu)
        patched = model(**inputs).logits
        hf_llava.remove(model)
        restored = model(**inputs).logits
    assert torch.allclose(plain, patched, atol=1e-5)
    assert torch.equal(plain, restored)


@pytest.fixture(scope="module")
def calibrated(photos):
    """Thresholds for each family's tower, found on the photos' crops."""
    out = {}
    for family in FAMILIES:
        model = build(family)
        enc = hf_llava.build_encoder(model, r_total=8)
        crops = pixels(family, photos)["pixel_values"].flatten(0, 1)
        out[family] = dymu.find_thresholds(enc, [crops[:24], crops[24:]])
    return out


def capture_lm_inputs(model) -> dict:
    """The keyword arguments of the language model's first call (the prefill)."""
    seen: dict = {}

    def hook(module, args, kwargs):
        if not seen:
            seen.update(kwargs)

    # first, before VTU's own hook turns the mapping into its packed plan
    model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    return seen


def expected_keys(model, encoder, inputs: dict) -> torch.Tensor:
    """Per position of the prompt, which merged token it holds (``-1``: its own slot),
    independently of dymu.lm.layouts: the unpatched model's own feature code runs with its
    projector output replaced by a random vector per merged token; a row still equal to one
    token's vector holds that token, a blend or a newline matches none."""
    keys = torch.full(inputs["input_ids"].shape, -1)
    first = 0
    for arg, method, token in (
        ("pixel_values", "get_image_features", IMAGE),
        ("pixel_values_videos", "get_video_features", VIDEO),
    ):
        if arg in inputs:
            found, first = rows_to_keys(model, encoder, inputs, arg, method, first)
            positions = (inputs["input_ids"] == token).nonzero().tolist()
            assert len(positions) == len(found)
            for (b, n), key in zip(positions, found, strict=True):
                keys[b, n] = key
    return keys


def rows_to_keys(model, encoder, inputs, arg, method, first):
    vlm, crops, made = model.model, [], {}

    def replace(module, args, output):
        out = encoder(crops[-1])
        flat_keys = first + (out.lengths.cumsum(0) - out.lengths)[:, None] + out.groups
        gen = torch.Generator().manual_seed(5)
        made["vectors"] = torch.randn(int(flat_keys.max()) + 1, output.shape[-1], generator=gen)
        return made["vectors"][flat_keys]

    hooks = [
        vlm.vision_tower.register_forward_pre_hook(lambda m, a: crops.append(a[0])),
        vlm.multi_modal_projector.register_forward_hook(replace),
    ]
    extra = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
    with torch.no_grad():
        feats = getattr(vlm, method)(inputs[arg], return_dict=True, **extra).pooler_output
    for hook in hooks:
        hook.remove()
    vectors, found = made["vectors"], []
    for row in torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]):
        close = [
            k for k in range(first, len(vectors)) if torch.allclose(row, vectors[k], atol=1e-5)
        ]
        found.append(close[0] if len(close) == 1 else -1)
    return found, len(vectors)


def slots_by_loop(keys: torch.Tensor) -> torch.Tensor:
    """Slots in order of first appearance; equal keys share one, -1 takes its own."""
    mapping = torch.zeros_like(keys)
    for b, row in enumerate(keys.tolist()):
        seen, next_slot = {}, 0
        for n, key in enumerate(row):
            if key >= 0 and key in seen:
                mapping[b, n] = seen[key]
                continue
            mapping[b, n] = next_slot
            if key >= 0:
                seen[key] = next_slot
            next_slot += 1
    return mapping


@pytest.mark.parametrize("family,case", CASES, ids=IDS)
def test_mapping_follows_the_models_own_arrangement(family, case, calibrated, photos):
    model, inputs = case(family, photos)
    encoder = hf_llava.build_encoder(model, calibrated[family])
    keys = expected_keys(model, encoder, inputs)
    hf_llava.apply(model, calibrated[family])
    seen = capture_lm_inputs(model)
    with torch.no_grad():
        model(**inputs)
    mapping, embeds = seen["vtu_mapping"], seen["inputs_embeds"]
    assert mapping.shape == inputs["input_ids"].shape  # the prompt keeps its length
    assert torch.equal(mapping, slots_by_loop(keys))
    # something was merged (in the batch: whether one small photo's pairs cross a threshold
    # can turn on a rounding step that differs between torch releases)
    assert (mapping.amax(1) + 1 < mapping.shape[1]).any()
    for b in range(mapping.shape[0]):
        rows, slots = embeds[b], mapping[b]
        firsts = torch.stack([rows[slots == s][0] for s in slots.unique()])
        assert torch.equal(rows, firsts[slots])  # a slot's positions hold one feature
        token = keys[b] >= 0  # and positions holding merged tokens share a slot only then
        assert len(rows[token].unique(dim=0)) == len(slots[token].unique())


@pytest.mark.parametrize("family,case", [CASES[0], CASES[4]], ids=[IDS[0], IDS[4]])
def test_greedy_generate_matches_naive_step_by_step(family, case, calibrated, photos):
    model, inputs = case(family, photos)
    inputs = {k: v[:1] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
    if "pixel_values" in inputs:  # the first prompt's image only
        inputs["image_sizes"] = inputs["image_sizes"][:1]
        inputs["pixel_values"] = inputs["pixel_values"][:1]
        keep = inputs["attention_mask"][0].bool()
        inputs["input_ids"], inputs["attention_mask"] = (
            inputs["input_ids"][:, keep],
            inputs["attention_mask"][:, keep],
        )
    steps = 4
    hf_llava.apply(model, calibrated[family])
    seen = capture_lm_inputs(model)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        lm, embed = model.model.language_model, model.get_input_embeddings()
        seq, seq_map = seen["inputs_embeds"], seen["vtu_mapping"]
        tokens = []
        for _ in range(steps):
            mask = torch.ones(seq.shape[:2], dtype=torch.long)
            nxt = int(naive_logits(lm, model.lm_head, seq, seq_map, mask)[0, -1].argmax())
            tokens.append(nxt)
            seq = torch.cat([seq, embed(torch.tensor([[nxt]]))], 1)
            seq_map = torch.cat([seq_map, seq_map.max()[None, None] + 1], 1)
    assert out[0, -steps:].tolist() == tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_simple_and_busy_images_get_different_counts(family, calibrated):
    """The counts are read from the patched model's own path: what the encoder apply()
    installed was given and returned inside generate(), and the mapping the LM was given."""
    model = build(family)
    inputs = pixels(family, [checkerboard(), noise()])
    counts, _ = feature_counts(model, inputs)
    ids, mask = prompts([[("text", 2), ("image", n), ("text", 2)] for n in counts])
    inputs = dict(inputs, input_ids=ids, attention_mask=mask)
    hf_llava.apply(model, calibrated[family])
    calls = []
    hf_llava.encoder_of(model).register_forward_hook(lambda m, a, out: calls.append((a[0], out)))
    seen = capture_lm_inputs(model)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(calls) == 1  # generate() encoded every crop once, in one batch, with DyMU
    crops, encoded = calls[0]
    lengths = []
    for image in inputs["pixel_values"]:  # each image's base view: where it sits in the batch
        row = [i for i in range(len(crops)) if torch.equal(crops[i], image[0])]
        assert len(row) == 1
        lengths.append(int(encoded.lengths[row[0]]))
    patches = encoded.groups.shape[1]
    assert lengths[0] < lengths[1] < patches
    slots = (seen["vtu_mapping"].amax(1) + 1).tolist()  # the LM ran at these lengths
    assert slots[0] < slots[1] < ids.shape[1]
    assert out.shape == (2, ids.shape[1] + 2)  # the prompt keeps the unmodified length


def test_patches_restore_exactly_what_was_there(calibrated, photos):
    model, inputs = batch_of_two("onevision", photos)
    vlm, lm = model.model, model.model.language_model
    attn = lm.layers[0].self_attn
    calls = []

    def wrap(module):  # someone else's instance wrapper, as accelerate's hooks are
        inner = module.forward

        def forward(*args, **kwargs):
            calls.append(type(module).__name__)
            return inner(*args, **kwargs)

        module.forward = forward
        return forward

    wrappers = {m: wrap(m) for m in (vlm, lm, attn)}
    modules = list(model.modules())
    before = [dict(vars(m)) for m in modules]
    classes = {type(m): dict(vars(type(m))) for m in modules}
    with torch.no_grad():
        plain = model(**inputs).logits
        hf_llava.apply(model, calibrated["onevision"])
        hf_llava.apply(model, calibrated["onevision"])  # idempotent
        calls.clear()
        model(**inputs)
        # the wrappers still run; VTU takes over the attention at full-length calls only
        assert set(calls) == {type(vlm).__name__, type(lm).__name__}
        calls.clear()
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert type(attn).__name__ in calls  # decoding steps go through the wrapper
        hf_llava.remove(model)
        again = model(**inputs).logits
    assert all(m.__dict__["forward"] is w for m, w in wrappers.items())
    assert [dict(vars(m)) for m in modules] == before
    assert {t: dict(vars(t)) for t in classes} == classes
    assert torch.equal(plain, again)


def test_other_classes_are_refused_in_one_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=64))  # fmt: skip
    with pytest.raises(dymu.DyMUError, match="not LlamaForCausalLM$"):
        hf_llava.apply(lm, never_merge())


def test_calibrate_a_saved_onevision_folder_then_apply(tmp_path, photo_dir, photos):
    """The README's path: thresholds for the model's own tower from its folder, then apply."""
    from dymu.cli import find_thresholds_main

    folder, out = tmp_path / "onevision", tmp_path / "ov.safetensors"
    build("onevision").save_pretrained(folder)
    args = ["--data", photo_dir / "images.json", "--hf-model", folder, "--r-total", 8]
    assert find_thresholds_main([str(a) for a in [*args, "--out", out, "--num-workers", 0]]) == 0
    _, inputs = batch_of_two("onevision", photos)
    model = type(build("onevision")).from_pretrained(folder).eval()
    hf_llava.apply(model, out)
    seen = capture_lm_inputs(model)
    with torch.no_grad():
        model(**inputs)
    mapping = seen["vtu_mapping"]
    assert (mapping.amax(1) + 1 < mapping.shape[1]).any()  # merged, VTU on
