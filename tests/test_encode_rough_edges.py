"""``dymu-encode`` and ``load_encoder`` rough edges: random weights said once, one line per
error, honest reasons for unreadable paths, batches, and the schedule a thresholds file
brings to a model instance."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import towers
from conftest import CONFIGS, PHOTOS, TINY
from PIL import Image

import dymu
from dymu import Thresholds, factory
from dymu.cli import encode_main, find_thresholds_main

MODEL = f"{TINY}-tome-24out"
ENCODE = "import sys; from dymu.cli import encode_main; sys.exit(encode_main())"


def run(args, capsys) -> tuple[int, str, str]:
    code = encode_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def encode_in_a_fresh_process(*args) -> subprocess.CompletedProcess:
    """``dymu-encode ARGS`` as a new process: the root logger as a user's shell has it."""
    cmd = [sys.executable, "-c", ENCODE, *map(str, args), "--model-config", CONFIGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def calibrated(photo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("th") / "t.safetensors"
    args = ["--data", photo_dir / "images.json", "--model", MODEL, "--pretrained", "none"]
    args += ["--batch-size", "4", "--num-workers", "0", "--out", out]
    assert find_thresholds_main([str(a) for a in args]) == 0
    return out


# 1. random weights are said once


def test_load_encoder_without_pretrained_warns_once_that_weights_are_random(caplog, monkeypatch):
    monkeypatch.setattr(factory, "_warned_random", [])
    caplog.set_level(logging.INFO)
    root = logging.getLogger()
    before = (list(root.handlers), list(root.filters), root.level)
    for _ in range(2):
        encoder = dymu.load_encoder(f"{TINY}-tome", r_total=0)
    assert encoder.pretrained == "none"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "random weights" in warned[0].getMessage()
    assert warned[0].name == "dymu.encoder.factory"
    # open_clip's own root-logger line comes back as a dymu info line, not from root
    assert not [r for r in caplog.records if r.name == "root"]
    assert any("open_clip: No pretrained weights" in r.getMessage() for r in caplog.records)
    assert (list(root.handlers), list(root.filters), root.level) == before

    monkeypatch.setattr(factory, "_warned_random", [])
    caplog.clear()
    dymu.load_encoder(f"{TINY}-tome", "none", r_total=0)  # random weights, as asked
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# 2. one line per error; the libraries' own output only with --verbose


def test_random_weights_run_prints_nothing_but_its_counts(photo_dir):
    image = photo_dir / "img" / "coffee.jpg"
    args = [image, "--model", MODEL, "--pretrained", "none", "--r-total", 0]
    proc = encode_in_a_fresh_process(*args)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.split()[1:] == ["65", "tokens"]


def test_bad_pretrained_is_one_line_and_verbose_adds_open_clips_reason(photo_dir):
    image = photo_dir / "img" / "coffee.jpg"
    args = [image, "--model", MODEL, "--pretrained", "no-such-tag", "--r-total", 0]
    proc = encode_in_a_fresh_process(*args)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("dymu-encode: error: cannot load weights 'no-such-tag'")
    verbose = encode_in_a_fresh_process(*args, "--verbose").stderr.splitlines()
    assert verbose[-1] == lines[0] and "ERROR:root" not in "".join(verbose)
    assert any(line.startswith("dymu-encode: open_clip: ") for line in verbose[:-1])


def test_transformers_loading_bars_show_only_with_verbose(photo_dir, tmp_path, capsys):
    towers.build("hf CLIP").save_pretrained(tmp_path / "clip")
    capsys.readouterr()
    args = [photo_dir / "img" / "coffee.jpg", "--hf-model", tmp_path / "clip", "--r-total", 0]
    code, out, err = run(args, capsys)
    assert code == 0 and "Loading weights" not in err and out.split()[1] == "65"
    code, out, err = run([*args, "--verbose"], capsys)
    assert code == 0 and "Loading weights" in err


# 3. what is wrong with a path, a name, a thresholds file


def _strerror_of_reading(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        return exc.strerror
    raise AssertionError(f"{path} was readable")


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_unreadable_paths_say_why(photo_dir, tmp_path, capsys):
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)  # opening it would wait for a writer: it must be refused unopened
    good = photo_dir / "img" / "coffee.jpg"
    images = [tmp_path, "/proc/self/mem", pipe, good]
    args = [*images, "--model", MODEL, "--pretrained", "none", "--r-total", 0]
    code, out, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 4 and "Traceback" not in err
    assert lines[0] == f"dymu-encode: cannot read image {tmp_path}: it is a directory"
    reason = _strerror_of_reading("/proc/self/mem")  # EIO: nothing is mapped at address 0
    assert lines[1] == f"dymu-encode: cannot read image /proc/self/mem: {reason}"
    assert lines[2].endswith(f"{pipe}: not a regular file (a device, pipe or socket)")
    assert out.split()[0] == str(good)


def test_a_name_keeping_no_tokens_says_so(capsys):
    with pytest.raises(dymu.DyMUError, match=r"keeps no tokens: -<K>out needs K from 1 to 64"):
        dymu.load_encoder(f"{TINY}-tome-0out", "none")
    code, _, err = run(["x.jpg", "--model", f"{TINY}-tome-0out", "--pretrained", "none"], capsys)
    assert code == 2 and err.count("\n") == 1 and "keeps no tokens" in err


def test_thresholds_for_another_model_name_the_file(photo_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    meta = {"model": "ViT-B-16-tome", "schedule": "constant"}
    Thresholds.from_values(torch.zeros(4), torch.full((4,), 6), meta).save(foreign)
    with pytest.raises(dymu.DyMUError) as python:
        dymu.load_encoder(MODEL, "none", thresholds=Thresholds.load(foreign))
    assert str(python.value).startswith(f"{foreign} was made for ViT-B-16-tome, not for {MODEL}")
    args = [photo_dir / "img" / "coffee.jpg", "--model", MODEL, "--pretrained", "none"]
    code, _, err = run([*args, "--thresholds", foreign], capsys)
    assert code == 2 and err == f"dymu-encode: error: {python.value}\n"


# 4. batches


def test_batch_size_changes_nothing_but_speed(photo_dir, calibrated, capsys):
    images = [photo_dir / "img" / f"{name}.jpg" for name in PHOTOS]
    args = [*images, "--model", MODEL, "--pretrained", "none", "--thresholds", calibrated]
    args += ["--per-block"]
    outs = {}
    for size in (2, 16):
        code, outs[size], err = run([*args, "--batch-size", size], capsys)
        assert code == 0 and f"{len(images)}/{len(images)}" in err  # the progress bar
    assert outs[2] == outs[16]
    counts = [int(line.split()[1]) for line in outs[2].splitlines()[: len(images)]]
    encoder = dymu.load_encoder(MODEL, "none", thresholds=calibrated)
    with torch.inference_mode():  # each image alone, through the library
        alone = [
            int(encoder(encoder.preprocess(Image.open(p).convert("RGB"))[None]).lengths[0])
            for p in images
        ]
    assert counts == alone and len(set(counts)) > 1
    code, out, err = run([*images[:3], *args[len(images) :], "--batch-size", 2], capsys)
    assert code == 0 and err == ""  # no bar for a few images
    assert [line.split() for line in out.splitlines()[:3]] == [
        line.split() for line in outs[2].splitlines()[:3]
    ]


def test_a_batch_out_of_memory_is_encoded_image_by_image(
    photo_dir, calibrated, capsys, monkeypatch
):
    """A batch too large for the device (the default is 16) is not the end of the run: its
    images are encoded one by one and give the counts the whole batch would have."""
    images = [photo_dir / "img" / f"{name}.jpg" for name in PHOTOS[:5]]
    args = [*images, "--model", MODEL, "--pretrained", "none", "--thresholds", calibrated]
    code, whole, _ = run(args, capsys)
    assert code == 0
    forward = dymu.DyMUEncoder.forward

    def small_device(self, inputs):
        if inputs.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, inputs)

    monkeypatch.setattr(dymu.DyMUEncoder, "forward", small_device)
    code, out, err = run(args, capsys)
    assert code == 0 and out == whole
    assert "out of memory on a batch of 5 images: encoding them one by one" in err


# 5. a thresholds file brings its schedule to instances and folders


def test_an_instance_takes_the_files_schedule(photos, tmp_path, caplog):
    visual = open_clip.create_model(TINY, pretrained=None).visual.eval()
    linear = [20, 15, 5, 0]  # the linear rule: r_total 40 over 4 blocks, r0 = 20, steps of 5
    identity = dymu.build_encoder(visual).identity
    meta = dict(identity.metadata(), schedule="linear", r_total="40")
    path = tmp_path / "linear.safetensors"
    Thresholds.from_values(torch.full((4,), -1.0), torch.tensor(linear), meta).save(path)
    assert Thresholds.load(path).r.tolist() == linear

    caplog.set_level(logging.WARNING)
    caplog.clear()  # open_clip's own random-init warning above
    encoder = dymu.load_encoder(visual, thresholds=path)
    assert encoder.r == linear and encoder.schedule_name == "linear"
    assert not caplog.records  # no 'calibrated with r=...' warning
    pixels = torch.stack([encoder.preprocess(p) for p in photos[:4]])
    with torch.inference_mode():
        steps = encoder(pixels).block_lengths
    before = torch.cat([torch.full((4, 1), 65), steps[:, :-1]], 1)
    merged = before - steps  # tokens each block removed, per image
    assert bool((merged[:, :3] > 0).all()) and bool((merged[:, 3] == 0).all())

    unsaid = dymu.load_encoder(visual, thresholds=path, r_total=None, schedule=None)
    assert unsaid.r == linear  # None says nothing: the file's schedule still applies
    mine = dymu.load_encoder(visual, thresholds=path, r_total=30)  # the caller's budget wins
    assert mine.r == [8, 8, 7, 7] and "calibrated with r=" in caplog.text


def test_other_libraries_warnings_still_show_while_open_clip_is_quieted():
    """Holding back open_clip's root-logger lines must not silence anyone else's warnings: a
    root logger without handlers still prints them through Python's last resort (checked in
    a fresh interpreter, where nothing configured logging)."""
    code = (
        "import logging\n"
        "from dymu.quiet import open_clip_logs\n"
        "with open_clip_logs():\n"
        "    logging.getLogger('timm.models').warning('a timm warning')\n"
        "root = logging.getLogger()\n"
        "assert not root.handlers and not root.filters\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "a timm warning" in proc.stderr
