"""DyMU in the original LLaVA package, selected by tower name in a tiny config."""

import subprocess
import sys

import llava.model.language_model.llava_llama as llava_llama  # llava-torch, installed --no-deps
import pytest
import torch
from conftest import TINY, TINY_LM, checkerboard, noise

import dymu
from dymu.integrations import llava as dymu_llava

IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX
NAME = f"{TINY}-tome-24out"


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


def build(thresholds, vtu=True, tower=NAME):
    torch.manual_seed(0)
    cfg = llava_llama.LlavaConfig(
        **TINY_LM,
        mm_vision_tower=tower,
        mm_hidden_size=64,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        dymu_pretrained="none",
        dymu_thresholds=str(thresholds),
        dymu_vtu=vtu,
        attn_implementation="sdpa",
    )
    model = llava_llama.LlavaLlamaForCausalLM(cfg).eval()
    model.get_model().get_vision_tower().load_model()
    return model


def images(model):
    tower = model.get_model().get_vision_tower()
    return torch.stack(
        [tower.encoder.preprocess(checkerboard()), tower.encoder.preprocess(noise())]
    )


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


def test_vtu_forward_equals_the_sequence_built_by_hand(thresholds, enabled):
    model = build(thresholds)
    tower = model.get_model().get_vision_tower()
    ids = torch.tensor([[1, 5, IMAGE, 7, 8]])
    x = images(model)[:1]
    with torch.no_grad():
        got = model(input_ids=ids, images=x).logits
        groups, lengths = tower.last_groups
        embed = model.get_model().embed_tokens
        features = model.get_model().mm_projector(tower(x))[0]
        embeds = torch.cat([embed(ids[0, :2]), features, embed(ids[0, 3:])])[None]
        n = int(lengths[0])
        mapping = torch.cat([torch.tensor([0, 1]), 2 + groups[0], torch.tensor([2 + n, 3 + n])])
        manual = model(inputs_embeds=embeds, vtu_mapping=mapping[None]).logits
    assert got.shape == (1, 2 + 64 + 2, 64)
    assert torch.allclose(got, manual, atol=1e-5)


def test_without_vtu_the_merged_tokens_are_fed_directly(thresholds, enabled):
    model = build(thresholds, vtu=False)
    ids = torch.tensor([[1, 5, IMAGE, 7, 8]])
    x = images(model)[:1]
    with torch.no_grad():
        logits = model(input_ids=ids, images=x).logits
        n = int(model.get_model().get_vision_tower().last_groups[1][0])
        out = model.generate(ids, images=x, max_new_tokens=2, do_sample=False)
    assert logits.shape[1] == 4 + n < 4 + 64 and out.shape == (1, 2)


def test_other_towers_untouched_and_disable_restores(thresholds):
    import llava.model.multimodal_encoder.builder as builder

    before = builder.build_vision_tower
    forward = llava_llama.LlavaLlamaForCausalLM.forward
    dymu_llava.enable()
    assert builder.build_vision_tower is not before
    assert not dymu_llava._is_dymu_name("openai/clip-vit-large-patch14-336")
    dymu_llava.disable()
    assert builder.build_vision_tower is before
    assert llava_llama.LlavaLlamaForCausalLM.forward is forward


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
