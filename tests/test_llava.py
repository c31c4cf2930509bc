"""DyMU in the original LLaVA package, selected by tower name in a tiny config."""

import subprocess
import sys

import llava.model.language_model.llava_llama as llava_llama  # llava-torch, installed --no-deps
import llava.model.language_model.llava_mistral as llava_mistral
import llava.model.language_model.llava_mpt as llava_mpt
import pytest
import torch
from conftest import TINY, TINY_LM, checkerboard, noise

import dymu
from dymu.integrations import llava as dymu_llava

IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX
NAME = f"{TINY}-tome-24out"
FAMILIES = {
    "llama": (llava_llama.LlavaConfig, llava_llama.LlavaLlamaForCausalLM),
    "mistral": (llava_mistral.LlavaMistralConfig, llava_mistral.LlavaMistralForCausalLM),
}


@pytest.fixture(scope="module")
def thresholds(tmp_path_factory, photos):
    enc = dymu.build_encoder(NAME)
    x = torch.stack([enc.preprocess(p) for p in photos])
    path = tmp_path_factory.mktemp("th") / "t.safetensors"
    dymu.find_thresholds(enc, [x[:6], x[6:]]).save(path)
    return path


@pytest.fixture
def enabled():
    dymu_llava.enable()
    dymu_llava.enable()  # idempotent
    yield
    dymu_llava.disable()


def build(thresholds, vtu=True, tower=NAME, family="llama", **extra):
    torch.manual_seed(0)
    config_cls, model_cls = FAMILIES[family]
    cfg = config_cls(
        **TINY_LM,
        mm_vision_tower=tower,
        mm_hidden_size=64,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        dymu_pretrained="none",
        dymu_thresholds=str(thresholds) if thresholds else None,
        dymu_vtu=vtu,
        attn_implementation="sdpa",
        **extra,
    )
    model = model_cls(cfg).eval()
    model.get_model().get_vision_tower().load_model()
    if hasattr(model.get_model(), "image_newline"):  # LLaVA leaves it uninitialised
        model.get_model().image_newline.data.normal_()
    return model


def images(model):
    tower = model.get_model().get_vision_tower()
    return torch.stack(
        [tower.encoder.preprocess(checkerboard()), tower.encoder.preprocess(noise())]
    )


def around_image(model, ids, features):
    """The embeddings LLaVA builds for ``ids`` (one image at position 2) by hand."""
    embed = model.get_model().embed_tokens
    return torch.cat([embed(ids[0, :2]), features, embed(ids[0, 3:])])[None]


def vtu_by_hand(model, ids, x, index):
    """Logits of image ``index`` (at position 2 of ``ids``) from the tower's last forward,
    built by hand: LLaVA's embeddings and a mapping written out position by position."""
    tower = model.get_model().get_vision_tower()
    groups, lengths = tower.last_groups
    embeds = around_image(model, ids, model.get_model().mm_projector(tower(x))[index])
    n = int(lengths[index])
    mapping = torch.cat([torch.tensor([0, 1]), 2 + groups[index], torch.tensor([2 + n, 3 + n])])
    return model(inputs_embeds=embeds, vtu_mapping=mapping[None]).logits


def test_loads_the_dymu_tower_by_name_and_generates(thresholds, enabled):
    model = build(thresholds)
    tower = model.get_model().get_vision_tower()
    assert isinstance(tower, dymu_llava.DyMULlavaTower) and tower.num_patches == 64
    ids = torch.tensor([[1, 5, IMAGE, 7, 8, 9]] * 2)
    x = images(model)
    with torch.no_grad():
        out = model.generate(
            ids, images=x, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
        )
    lengths = tower.last_groups[1].tolist()
    assert lengths[0] < lengths[1] < 64  # the checkerboard keeps fewer tokens than noise
    assert out.shape == (2, 3)


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")  # dymu passes none
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_vtu_forward_equals_the_sequence_built_by_hand(thresholds, enabled, family):
    model = build(thresholds, family=family)
    ids = torch.tensor([[1, 5, IMAGE, 7, 8]])
    x = images(model)[:1]
    with torch.no_grad():
        got = model(input_ids=ids, images=x).logits
        manual = vtu_by_hand(model, ids, x, 0)
    assert got.shape == (1, 2 + 64 + 2, 64)
    assert torch.allclose(got, manual, atol=1e-5)


def test_fixed_r_tower_keeps_every_image_at_one_length(thresholds, enabled):
    model = build(None, dymu_r=4)
    tower = model.get_model().get_vision_tower()
    ids = torch.tensor([[1, 5, IMAGE, 7, 8]] * 2)
    x = images(model)
    with torch.no_grad():
        got = model(input_ids=ids, images=x).logits
        lengths = tower.last_groups[1]
        manual = vtu_by_hand(model, ids[:1], x, 1)
    # 65 tokens, 3 blocks run (select layer -2), 4 merged in each, then the class token dropped
    assert lengths.tolist() == [65 - 3 * 4 - 1] * 2
    assert torch.allclose(got[1:], manual, atol=1e-5)
    with pytest.raises(dymu.DyMUError, match="not both"):
        build(thresholds, dymu_r=4)


def test_without_vtu_the_llm_runs_unchanged_on_repeated_features(thresholds, enabled):
    model = build(thresholds, vtu=False)
    tower = model.get_model().get_vision_tower()
    ids = torch.tensor([[1, 5, IMAGE, 7, 8]])
    x = images(model)[:1]
    with torch.no_grad():
        got = model(input_ids=ids, images=x).logits
        groups, _ = tower.last_groups
        merged = tower.encoder(x).tokens[0]
        features = model.get_model().mm_projector(merged[groups[0]])  # repeated by hand
        embeds = around_image(model, ids, features)
        plain = llava_llama.LlamaForCausalLM.forward(model, inputs_embeds=embeds).logits
        out = model.generate(ids, images=x, max_new_tokens=2, do_sample=False)
    assert got.shape == (1, 4 + 64, 64) and torch.allclose(got, plain, atol=1e-5)
    assert out.shape == (1, 2)


def test_direct_feeds_the_merged_tokens(thresholds, enabled):
    model = build(thresholds, dymu_direct=True)
    ids = torch.tensor([[1, 5, IMAGE, 7, 8]])
    x = images(model)[:1]
    with torch.no_grad():
        logits = model(input_ids=ids, images=x).logits
        n = int(model.get_model().get_vision_tower().last_groups[1][0])
        out = model.generate(ids, images=x, max_new_tokens=2, do_sample=False)
    assert logits.shape[1] == 4 + n < 4 + 64 and out.shape == (1, 2)


def test_mpt_is_refused_in_one_line(thresholds, enabled):
    cfg = llava_mpt.LlavaMptConfig(
        d_model=32, n_heads=4, n_layers=1, vocab_size=64, mm_vision_tower=NAME,
        mm_vision_select_layer=-2, dymu_pretrained="none", dymu_thresholds=str(thresholds),
    )  # fmt: skip
    with pytest.raises(dymu.DyMUError, match="LLaVA-Llama and LLaVA-Mistral models, not llava_mpt"):
        llava_mpt.LlavaMptForCausalLM(cfg)


def test_other_towers_untouched_and_disable_restores(thresholds):
    import llava.model.llava_arch as arch
    import llava.model.multimodal_encoder.builder as builder

    classes = [arch.LlavaMetaForCausalLM, llava_mpt.LlavaMptForCausalLM]
    classes += [cls for _, cls in FAMILIES.values()]
    before = [dict(vars(cls)) for cls in classes]
    tower_builders = builder.build_vision_tower, arch.build_vision_tower
    dymu_llava.enable()
    assert builder.build_vision_tower is not tower_builders[0]
    assert not dymu_llava._is_dymu_name("openai/clip-vit-large-patch14-336")
    dymu_llava.disable()
    assert (builder.build_vision_tower, arch.build_vision_tower) == tower_builders
    assert [dict(vars(cls)) for cls in classes] == before  # nothing added, nothing left


def test_module_runner(tmp_path):
    (tmp_path / "probe_llava.py").write_text(
        "import llava.model.multimodal_encoder.builder as b, sys\n"
        "print('patched' if b.build_vision_tower.__module__.startswith('dymu') else 'plain',"
        " sys.argv[1:])\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "dymu.integrations.llava", "probe_llava", "--x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "patched ['--x']" in proc.stdout


ANYRES = dict(  # LLaVA-1.6: a base view plus grid crops, unpadded, newline per row
    image_aspect_ratio="anyres",
    mm_patch_merge_type="spatial_unpad",
    image_grid_pinpoints=[[64, 128], [128, 64], [128, 128]],
)


def anyres_inputs(model, photos):
    from llava.mm_utils import process_images

    tower = model.get_model().get_vision_tower()
    pictures = [photos[0].resize((120, 70)), photos[3].resize((70, 120))]  # both get unpadded
    pixels = process_images(pictures, tower.image_processor, model.config)
    return pixels, [p.size for p in pictures]


def test_anyres_with_nothing_merged_equals_llava_itself(tmp_path, photos, enabled):
    never = tmp_path / "never.safetensors"
    dymu.Thresholds.from_values(torch.full((4,), 2.0), torch.full((4,), 10)).save(never)
    model = build(never, **ANYRES)
    pixels, sizes = anyres_inputs(model, photos)
    ids = torch.tensor([[1, 5, IMAGE, 7, 8]] * 2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, images=pixels, image_sizes=sizes).logits
        # LLaVA's own arrangement (crops, unpadding, newlines) run by the plain Llama
        prepared = model.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, None, pixels, sizes
        )
        plain = model(inputs_embeds=prepared[4], attention_mask=prepared[2]).logits
    assert got.shape == plain.shape and got.shape[1] > 5 + 64 * 2  # base view + crops
    assert torch.allclose(got, plain, atol=1e-5)


def test_anyres_groups_follow_llavas_arrangement(thresholds, photos, enabled):
    model = build(thresholds, **ANYRES)
    pixels, sizes = anyres_inputs(model, photos)
    ids = torch.tensor([[1, 5, IMAGE, 7, 8]] * 2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        position_ids, new_mask, _, embeds, _, mapping = dymu_llava._prepare(
            model, ids, None, mask, None, None, pixels, sizes
        )
        lengths = model.get_model().get_vision_tower().last_groups[1]
        patch = dymu_llava._trace(model, ids, mask, pixels, sizes) >= 0  # not text, newline
        out = model.generate(
            ids, attention_mask=mask, images=pixels, image_sizes=sizes, max_new_tokens=2
        )
    assert out.shape == (2, 2) and int(lengths.sum()) < 64 * len(lengths)
    for b in range(2):
        slots, rows = mapping[b], embeds[b]
        for slot in slots.unique():  # positions sharing a slot hold the same feature
            same = rows[slots == slot]
            assert (same == same[0]).all()
        # and patch positions holding different features never share one
        patch_slots, patch_rows = slots[patch[b]], rows[patch[b]]
        assert len(patch_slots.unique()) == len(patch_rows.unique(dim=0)) < len(patch_slots)
        newlines = (rows == model.get_model().image_newline).all(-1)
        assert newlines.sum() > 0 and not (patch[b] & newlines).any()


def test_anyres_direct_is_a_clear_error(thresholds, photos, enabled):
    model = build(thresholds, dymu_direct=True, **ANYRES)
    pixels, sizes = anyres_inputs(model, photos)
    with pytest.raises(dymu.DyMUError, match="need dymu_direct: false"):
        model(input_ids=torch.tensor([[1, IMAGE, 7]] * 2), images=pixels, image_sizes=sizes)
