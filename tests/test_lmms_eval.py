"""The lmms-eval plugin end to end, with no network: lmms-eval's own CLI (``python -m
lmms_eval --config runs.yaml``, one process for every run) evaluates a tiny llava-hf model on a
local task of real photos, as lmms-eval's plain ``llava_hf`` and as ``dymu_llava_hf``."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import dymu
from dymu import Thresholds
from dymu.integrations import hf_llava

# the eval extra (pip install -e '.[test,eval]', as the README and .ci/run do): lmms-eval, and
# decord, which its llava_hf imports; a missing one fails here, by name, not as a skip
for needed in ("lmms_eval", "decord"):
    __import__(needed)

IMAGE_TOKEN, PATCHES = 63, 16  # test_hf_llava's tiny model: 32 x 32 images, 8 x 8 patches
DOCS = [  # (photo, question, answer)
    ("astronaut", "what is in the photo ?", "astronaut"),
    ("coffee", "what is in the photo ?", "coffee"),
    ("chelsea", "is the photo a cat ?", "yes"),
    ("rocket", "what is in the photo ?", "rocket"),
]
WORDS = "USER ASSISTANT : ? . what is in the photo a cat rocket coffee astronaut yes no".split()
TEMPLATE = (  # llava-1.5-hf's chat template, shortened; string contents for the simple class
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TASK = """task: dymu_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""
UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]
"""


def processor():
    """llava-hf's processor over a word-level tokenizer built offline (vocabulary of the
    tiny model's 64 ids, ``<image>`` at its image token id)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    vocab = specials + WORDS
    vocab += [f"w{i}" for i in range(IMAGE_TOKEN - len(vocab))] + ["<image>"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials + ["<image>"]])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=8,
        chat_template=TEMPLATE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, photo_dir):
    """The saved model and processor, the task, and thresholds that merge nothing / some."""
    from test_hf_llava import build

    root = tmp_path_factory.mktemp("lmms_eval")
    model, proc = build(), processor()
    model.save_pretrained(root / "model")
    proc.save_pretrained(root / "model")
    images = sorted((photo_dir / "img").glob("*.jpg"))
    x = proc.image_processor([_open(p) for p in images], return_tensors="pt")["pixel_values"]
    encoder = hf_llava.build_encoder(model, r_total=8)
    dymu.find_thresholds(encoder, [x[:4], x[4:8], x[8:]]).save(root / "merge.safetensors")
    never = Thresholds.from_values(torch.ones(3), torch.tensor([2, 2, 2]), {"model": "tiny"})
    never.save(root / "never.safetensors")
    docs = write_task(root, photo_dir)
    return root, model, proc, docs


def write_task(root: Path, photo_dir: Path) -> list[dict]:
    """The local lmms-eval task ``dymu_tiny`` over the bundled photos, under ``root/task``;
    returns its documents."""
    task = root / "task"
    task.mkdir()
    docs = [
        {"image": str(photo_dir / "img" / f"{n}.jpg"), "question": q, "answer": a}
        for n, q, a in DOCS
    ]
    (task / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (task / "dymu_tiny.yaml").write_text(TASK.format(data=task / "data.jsonl"))
    (task / "utils.py").write_text(UTILS)
    return docs


def _open(path) -> Image.Image:
    return Image.open(path).convert("RGB")


# name -> (model, model_args beyond pretrained and device_map, more CLI args); lmms-eval's
# --config runs them all in one process (each start costs ~10 s of imports, ~5 s per run of
# task indexing). "neither" is refused before its model loads: lmms-eval logs it, goes on.
RUNS = {
    "plain": ("llava_hf", "", {}),
    "never": ("dymu_llava_hf", ",thresholds={root}/never.safetensors,vtu=True", {}),
    "merge": ("dymu_llava_hf", ",thresholds={root}/merge.safetensors", {}),
    "fixed": ("dymu_llava_hf", ",r=3,vtu=False", {"force_simple": True}),
    "neither": ("dymu_llava_hf", ",vtu=True", {}),
}


@pytest.fixture(scope="module")
def runs(built):
    """Every run of :data:`RUNS` through lmms-eval's CLI in one process: results, samples by
    doc id, and the combined output."""
    root = built[0]
    runs = {
        name: (model, f"pretrained={root}/model,device_map=cpu" + args.format(root=root), more)
        for name, (model, args, more) in RUNS.items()
    }
    return run_lmms_eval(root, runs, refused={"neither"})


def run_lmms_eval(root: Path, runs: dict, refused: set[str]) -> tuple[dict, str]:
    """``python -m lmms_eval --config`` over ``runs`` (name -> (model, model_args, more CLI
    settings)) on the local task, offline, in one process: ``(results and samples by run, the
    combined output)``; runs in ``refused`` must fail to load (lmms-eval logs and goes on)."""
    config = [
        dict(
            model=model,
            model_args=args,
            tasks="dymu_tiny",
            include_path=str(root / "task"),
            log_samples=True,
            output_path=str(root / "out" / name),
            device="cpu",
            batch_size=1,
            **more,
        )
        for name, (model, args, more) in runs.items()
    ]
    (root / "runs.yaml").write_text(yaml.safe_dump(config))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        HF_HOME=str(root / "hf"),
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--config", str(root / "runs.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    found = {name: _read(root / "out" / name) for name in runs if name not in refused}
    assert all(found.values()), output[-5000:]  # lmms-eval logs a failed run and goes on
    return found, output


def _read(out: Path) -> tuple[dict, dict] | None:
    results = list(out.glob("*/*_results.json"))
    samples = list(out.glob("*/*_samples_dymu_tiny.jsonl"))
    if not (results and samples):
        return None
    by_doc = {}
    for line in samples[0].read_text().splitlines():
        row = json.loads(line)
        by_doc[row["doc_id"]] = row["filtered_resps"]
    return json.loads(results[0].read_text()), by_doc


def _stats(results: dict) -> dict[str, float]:
    """dymu's token statistics from lmms-eval's results (its throughput section)."""
    prefix = "avg_dymu_visual_tokens_"
    return {k[len(prefix) :]: v for k, v in results["throughput"].items() if k.startswith(prefix)}


def _expected(lengths: list[int]) -> dict[str, float]:
    return dict(
        mean=statistics.mean(lengths),
        std=statistics.pstdev(lengths),
        min=min(lengths),
        max=max(lengths),
        count=len(lengths),
        unmerged=PATCHES,
    )


def test_the_plugin_is_found_through_lmms_eval_entry_points(runs):
    found, _ = runs
    backends = {name: found[name][0]["config"]["model_backend"] for name in found}
    assert backends["plain"].endswith("chat.llava_hf.LlavaHf (chat)")
    assert backends["merge"] == "dymu.integrations.lmms_eval.llava_hf.DyMULlavaHfChat (chat)"
    assert backends["fixed"] == "dymu.integrations.lmms_eval.llava_hf.DyMULlavaHf (simple)"


def test_nothing_merged_answers_equal_plain_llava_hf(runs):
    found, _ = runs
    (plain, plain_out), (never, never_out) = found["plain"], found["never"]
    assert sorted(plain_out) == list(range(len(DOCS)))
    assert any(text.strip() for text in plain_out.values())  # a real comparison, not ""s
    assert never_out == plain_out
    assert never["results"]["dymu_tiny"] == plain["results"]["dymu_tiny"]
    assert _stats(never) == pytest.approx(_expected([PATCHES] * len(DOCS)))


def test_merging_reports_the_token_counts_the_encoder_gives(runs, built):
    found, output = runs
    root, model, proc, docs = built
    x = proc.image_processor([_open(d["image"]) for d in docs], return_tensors="pt")
    encoder = hf_llava.build_encoder(model, Thresholds.load(root / "merge.safetensors"))
    with torch.no_grad():
        lengths = [int(encoder(x["pixel_values"][i : i + 1]).lengths) for i in range(len(docs))]
    want = _expected(lengths)
    assert want["mean"] < PATCHES
    assert _stats(found["merge"][0]) == pytest.approx(want)
    line = (
        f"DyMU visual tokens per image: mean {want['mean']:.2f}, std {want['std']:.2f}, "
        f"min {want['min']}, max {want['max']}, count {len(docs)} (of {PATCHES} patches)"
    )
    assert line in output


def test_fixed_r_without_vtu_in_lmms_evals_simple_class(runs):
    found, _ = runs
    results, answers = found["fixed"]
    assert len(answers) == len(DOCS)
    # 17 tokens with the class token, 2 blocks run, each merges min(3, (n - 1) // 2)
    assert _stats(results) == pytest.approx(_expected([17 - 3 - 3 - 1] * len(DOCS)))


def test_neither_thresholds_nor_r_is_refused_before_loading(runs):
    _, output = runs
    assert "dymu_llava_hf needs one of thresholds=FILE (DyMU) or r=INT" in output


def test_a_refused_model_fails_the_run_under_debug_verbosity(built):
    """lmms-eval logs a model that fails to load and exits 0; with --verbosity DEBUG it
    re-raises, so scripts can see the failure (the README tells users so)."""
    root = built[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"))
    args = [sys.executable, "-m", "lmms_eval", "--model", "dymu_llava_hf", "--tasks", "dymu_tiny"]
    args += ["--include_path", str(root / "task"), "--device", "cpu", "--batch_size", "1"]
    args += ["--model_args", f"pretrained={root}/model,device_map=cpu,vtu=True"]
    quiet = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    loud = subprocess.run(
        [*args, "--verbosity", "DEBUG"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=300,
    )
    assert quiet.returncode == 0  # lmms-eval's own behaviour, documented in the README
    assert loud.returncode != 0
    assert "dymu_llava_hf needs one of thresholds=FILE" in loud.stdout + loud.stderr
