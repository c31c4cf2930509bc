"""DyMU in a tiny transformers LlavaForConditionalGeneration built from a config."""

import numpy as np
import pytest
import torch
from conftest import TINY_LM, checkerboard, noise
from hf_vlms import TOWER
from naive_vtu import naive_logits
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import dymu
from dymu import Thresholds
from dymu.integrations import hf_llava
from dymu.lm.vtu import apply_vtu
from dymu.towers import HFCLIPTower

IMAGE_TOKEN = 63
PATCHES = 16  # 32 x 32 images, 8 x 8 patches
MEAN = torch.tensor([0.4815, 0.4578, 0.4082])[:, None, None]
STD = torch.tensor([0.2686, 0.2613, 0.2758])[:, None, None]


def build():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(**TOWER)
    text = LlamaConfig(**TINY_LM)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def pixels(images) -> torch.Tensor:
    out = []
    for img in images:
        arr = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32) / 255
        out.append((torch.from_numpy(arr).permute(2, 0, 1) - MEAN) / STD)
    return torch.stack(out)


def prompts(count: int) -> torch.Tensor:
    row = [1, 5] + [IMAGE_TOKEN] * PATCHES + [7, 8, 9]
    return torch.tensor([row] * count)


def never_merge(model) -> Thresholds:
    return Thresholds.from_values(torch.ones(3), torch.tensor([2, 2, 2]), {"model": "tiny-tome"})


def naive_mapping(input_ids, groups, lengths):
    """Loop version of the mapping: text tokens a slot each, images their merged slots."""
    rows, image = [], 0
    for ids in input_ids.tolist():
        row, slot, seen = [], 0, 0
        for token in ids:
            if token == IMAGE_TOKEN:
                row.append(slot + int(groups[image, seen]))
                seen += 1
                if seen == PATCHES:
                    slot += int(lengths[image])
                    image, seen = image + 1, 0
            else:
                row.append(slot)
                slot += 1
        rows.append(row)
    return torch.tensor(rows)


def test_adapter_matches_transformers_clip(photos):
    model = build()
    enc = hf_llava.build_encoder(model)  # r_total=0: no merging
    assert isinstance(enc.tower, HFCLIPTower)
    x = pixels(photos[:4])
    with torch.no_grad():
        out = enc(x)
        ref = model.model.vision_tower(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert out.tokens.shape == ref.shape and torch.allclose(out.tokens, ref, atol=1e-5)


@pytest.mark.parametrize("vtu", [True, False])
def test_nothing_merged_equals_the_original_model(photos, vtu):
    model = build()
    x, ids = pixels(photos[:2]), prompts(2)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=x).logits
        hf_llava.apply(model, never_merge(model), vtu=vtu)
        patched = model(input_ids=ids, pixel_values=x).logits
        hf_llava.remove(model)
        restored = model(input_ids=ids, pixel_values=x).logits
    assert torch.allclose(plain, patched, atol=1e-5)
    assert torch.equal(plain, restored)


@pytest.fixture(scope="module")
def calibrated(photos):
    model = build()
    enc = hf_llava.build_encoder(model, r_total=8)
    x = pixels(photos)
    return dymu.find_thresholds(enc, [x[:4], x[4:8], x[8:]])


def lm_prefill_kwargs(model) -> dict:
    """The keyword arguments of the language model's first call (the prefill), as the VLM
    passed them (before VTU's own hook turns the mapping into its packed plan)."""
    seen: dict = {}
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: None if seen else seen.update(kw), with_kwargs=True, prepend=True
    )
    return seen


def test_merging_generates_with_different_token_counts(calibrated):
    """The counts are read from the patched model's own path: what the encoder apply()
    installed returned inside generate(), and the slots of the mapping the LM was given."""
    model = build()
    hf_llava.apply(model, calibrated)
    encoded = []
    hf_llava.encoder_of(model).register_forward_hook(lambda m, a, out: encoded.append(out))
    prefill = lm_prefill_kwargs(model)
    x, ids = pixels([checkerboard(), noise()]), prompts(2)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            pixel_values=x,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
        )
    assert len(encoded) == 1  # generate() encoded once, with DyMU
    counts = encoded[0].lengths.tolist()
    assert counts[0] < counts[1] < PATCHES  # the checkerboard keeps fewer tokens than noise
    slots = (prefill["vtu_mapping"].amax(1) + 1).tolist()  # the LM ran at these lengths
    assert slots == [ids.shape[1] - PATCHES + c for c in counts]
    assert out.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("mode", ["thresholds", "fixed r"])
def test_patched_model_equals_the_pipeline_by_hand(calibrated, mode):
    model = build()
    x, ids = pixels([checkerboard(), noise()]), prompts(2)
    how = {"thresholds": calibrated} if mode == "thresholds" else {"r": 3}
    enc = hf_llava.build_encoder(model, **how)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        out = enc(x)
        merged = model.model.multi_modal_projector(out.tokens)
        features = [merged[i][out.groups[i]] for i in range(2)]
        mapping = naive_mapping(ids, out.groups, out.lengths)
        lm = apply_vtu(model.model.language_model)  # the LM alone patched, fed by hand
        manual = model(
            input_ids=ids,
            vtu_mapping=mapping,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
        ).logits
        dymu.remove_vtu(lm)
        hf_llava.apply(model, **how)
        got = model(input_ids=ids, pixel_values=x).logits
    assert torch.allclose(got, manual, atol=1e-5)
    if mode == "fixed r":  # 17 tokens, 2 blocks run, each merges min(3, (n - 1) // 2)
        assert out.lengths.tolist() == [17 - 3 - 3 - 1] * 2
    else:
        assert out.lengths[0] < out.lengths[1]


def test_thresholds_or_r_one_of_them():
    with pytest.raises(dymu.DyMUError, match="not both"):
        hf_llava.apply(build(), never_merge(None), r=2)
    with pytest.raises(dymu.DyMUError, match="needs thresholds"):
        hf_llava.apply(build())


def test_image_token_count_mismatch_is_a_clear_error(calibrated):
    model = hf_llava.apply(build(), calibrated)
    with pytest.raises(dymu.DyMUError, match="16 image tokens but the images give 32 features"):
        model(input_ids=prompts(1), pixel_values=pixels([checkerboard(), noise()]))


def test_per_call_feature_choice_is_honoured_or_refused(calibrated):
    model = build()
    hf_llava.apply(model, calibrated)
    x, ids = pixels([checkerboard()]), prompts(1)
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        same = model(input_ids=ids, pixel_values=x, vision_feature_layer=layer).logits
        assert torch.equal(same, model(input_ids=ids, pixel_values=x).logits)
        with pytest.raises(dymu.DyMUError, match=f"vision_feature_layer={layer}, not -1"):
            model(input_ids=ids, pixel_values=x, vision_feature_layer=-1)
        with pytest.raises(dymu.DyMUError, match="strategy='default', not 'full'"):
            model(input_ids=ids, pixel_values=x, vision_feature_select_strategy="full")


def test_generate_encodes_with_dymu_and_matches_naive_step_by_step(calibrated):
    """generate() encodes images before its first forward call: DyMU must be in that path,
    its features in the right places and the prompt's keys and values in the KV cache. The
    reference: the unpatched model's embeddings with the merged features written into the
    image positions by a loop, the loop-written mapping, and VTU run naively step by step on
    the unpatched language model, every step at full length with no cache."""
    ref = build()  # the same seeded weights, never patched
    x, ids = pixels([checkerboard()]), prompts(1)
    steps = 4
    with torch.no_grad():
        merged = hf_llava.build_encoder(ref, calibrated)(x)
        projected = ref.model.multi_modal_projector(merged.tokens)[0]
        seq = ref.get_input_embeddings()(ids)
        seen = 0
        for n, token in enumerate(ids[0].tolist()):
            if token == IMAGE_TOKEN:
                seq[0, n] = projected[merged.groups[0, seen]]
                seen += 1
        mapping = naive_mapping(ids, merged.groups, merged.lengths)
        lm, tokens, want_logits = ref.model.language_model, [], []
        for _ in range(steps):
            mask = torch.ones(seq.shape[:2], dtype=torch.long)
            logits = naive_logits(lm, ref.lm_head, seq, mapping, mask)[0, -1]
            want_logits.append(logits)
            tokens.append(int(logits.argmax()))
            seq = torch.cat([seq, ref.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], 1)
            mapping = torch.cat([mapping, mapping.max()[None, None] + 1], 1)
        model = hf_llava.apply(build(), calibrated)
        out = model.generate(
            input_ids=ids,
            pixel_values=x,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert int(merged.lengths[0]) < PATCHES  # something merged, so VTU is not the identity
    assert out.sequences[0, -steps:].tolist() == tokens
    for got, want in zip(out.logits, want_logits, strict=True):
        assert torch.allclose(got[0], want, atol=1e-4)


def test_encoder_of_names_the_applied_encoder():
    model = build()
    assert hf_llava.encoder_of(model) is None
    hf_llava.apply(model, r=2)
    encoder = hf_llava.encoder_of(model)
    assert isinstance(encoder, dymu.DyMUEncoder) and encoder is hf_llava.encoder_of(model.model)
    hf_llava.remove(model)
    assert hf_llava.encoder_of(model) is None
