"""``dymu_qwen2_5_vl`` and ``dymu_qwen3_vl`` end to end, with no network: lmms-eval's own CLI
(one process for every run) evaluates a tiny Qwen2.5-VL and a tiny Qwen3-VL on a local task
of real photos, as lmms-eval's plain ``qwen2_5_vl`` / ``qwen3_vl`` and with dymu; lmms-eval's
Qwen path (chat template, ``qwen_vl_utils``, the processor at dynamic resolution) runs
unchanged."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from qwen_vlms import END, IMAGE, PAD, START, VIDEO, build
from test_lmms_eval import DOCS, _stats, run_lmms_eval, write_task

import dymu
from dymu import Thresholds
from dymu.integrations import hf_qwen_vl

# the eval extra: lmms-eval, and qwen_vl_utils, which its Qwen models import; a missing one
# fails here, by name, not as a skip
for needed in ("lmms_eval", "qwen_vl_utils"):
    __import__(needed)

WORDS = "system You are a helpful assistant . user what is in the photo ? cat rocket".split()
WORDS += "coffee astronaut yes no".split()
SPECIALS = {
    PAD: "<|endoftext|>", 1: "[UNK]", 2: "<|im_start|>", 3: "<|im_end|>", IMAGE: "<|image_pad|>",
    VIDEO: "<|video_pad|>", START: "<|vision_start|>", END: "<|vision_end|>",
}  # fmt: skip
TEMPLATE = (  # Qwen's chat template, shortened
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
PIXELS = "min_pixels=3136,max_pixels=50176"  # photos at most 224 x 224: 64 LLM tokens
PATCHES = {"qwen2_5_vl": 14, "qwen3_vl": 16}


def processor(family: str):
    """The family's processor over a word-level tokenizer built offline (the tiny model's
    300 ids, Qwen's special tokens at the model's ids), at the family's patch size (lmms-eval
    resizes Qwen3-VL's images for 16 px patches)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    fillers = iter([*WORDS, *(f"w{i}" for i in range(300))])
    vocab = [SPECIALS.get(i) or next(fillers) for i in range(300)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS.values()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    sizes = dict(patch_size=PATCHES[family], merge_size=2, temporal_patch_size=2)
    if family == "qwen3_vl":
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(**sizes),
            tokenizer=fast,
            video_processor=Qwen3VLVideoProcessor(**sizes),
            chat_template=TEMPLATE,
        )
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=fast,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=TEMPLATE,
    )


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def built(tmp_path_factory, photo_dir, family):
    """The saved model and processor, the task, and thresholds that merge nothing / some."""
    root = tmp_path_factory.mktemp(f"lmms_eval_{family}")
    model, proc = build(family, PATCHES[family]), processor(family)
    model.save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
    images = [Image.open(p).convert("RGB") for p in sorted((photo_dir / "img").glob("*.jpg"))]
    small = {"size": {"shortest_edge": 3136, "longest_edge": 50176}}
    batches = [
        proc.image_processor(images[i : i + 4], **small, return_tensors="pt") for i in (0, 4, 8)
    ]
    encoder = hf_qwen_vl.build_encoder(model, r_total=3)
    dymu.find_thresholds(encoder, [dict(b) for b in batches]).save(root / "merge.safetensors")
    never = Thresholds.from_values(
        torch.ones(len(encoder.r)), torch.tensor(encoder.r), encoder.identity.metadata()
    )
    never.save(root / "never.safetensors")
    docs = write_task(root, photo_dir)
    return root, model, proc, docs


RUNS = {  # name -> (model, model_args beyond pretrained, device_map and pixels)
    "plain": ("{family}", ""),
    "never": ("dymu_{family}", ",thresholds={root}/never.safetensors"),
    "merge": ("dymu_{family}", ",thresholds={root}/merge.safetensors,vtu=True"),
    "neither": ("dymu_{family}", ",vtu=True"),
}


@pytest.fixture(scope="module")
def runs(built, family):
    """Every run of :data:`RUNS` through lmms-eval's CLI in one process."""
    root = built[0]
    base = f"pretrained={root}/model,device_map=cpu,{PIXELS}"
    runs = {
        name: (m.format(family=family), base + args.format(root=root), {})
        for name, (m, args) in RUNS.items()
    }
    return run_lmms_eval(root, runs, refused={"neither"})


def test_the_qwen_plugin_is_found_through_lmms_eval_entry_points(runs, family):
    found, _ = runs
    backend = found["merge"][0]["config"]["model_backend"]
    name = {"qwen2_5_vl": "DyMUQwen2_5_VLChat", "qwen3_vl": "DyMUQwen3_VLChat"}[family]
    assert backend == f"dymu.integrations.lmms_eval.qwen_vl.{name} (chat)"


def test_nothing_merged_answers_equal_plain_qwen(runs):
    found, _ = runs
    (plain, plain_out), (never, never_out) = found["plain"], found["never"]
    assert sorted(plain_out) == list(range(len(DOCS)))
    assert any(text.strip() for text in plain_out.values())  # a real comparison, not ""s
    assert never_out == plain_out
    assert never["results"]["dymu_tiny"] == plain["results"]["dymu_tiny"]
    stats = _stats(never)
    assert stats["count"] == len(DOCS) and stats["unmerged"] == 0  # dynamic resolution


def test_merging_keeps_fewer_tokens_and_says_so(runs):
    found, output = runs
    never, merged = _stats(found["never"][0]), _stats(found["merge"][0])
    assert merged["count"] == len(DOCS) and merged["mean"] < never["mean"]
    assert "DyMU visual tokens per frame (an image, or a video's temporal patch): mean" in output


def test_missing_thresholds_are_refused_before_loading(runs, family):
    _, output = runs
    assert f"dymu_{family} needs thresholds=FILE in --model_args" in output
