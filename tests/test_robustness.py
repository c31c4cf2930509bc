"""Safe to leave running: each failure a new user meets ends in one line and exit code 2 (or
the interrupt's code), before any work where it can be known up front, and no work is lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, TINY
from PIL import Image

from dymu import Thresholds
from dymu.calibration.job import CalibrationConfig, run_calibration
from dymu.cli import encode_main, find_thresholds_main

MODEL = f"{TINY}-tome-24out"
FIND = "dymu-find-thresholds"


def run(main, args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The message a failure ends with: one line, after any progress bar, no traceback."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def calibrate(data, out, *extra) -> list[str]:
    args = ["--data", data, "--model", MODEL, "--pretrained", "none", "--batch-size", 2]
    return [str(a) for a in [*args, "--num-workers", 0, "--out", out, *extra]]


def same_result(a: Thresholds, b: Thresholds) -> bool:
    return torch.equal(a.count, b.count) and torch.allclose(a.sum, b.sum, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def full(photo_dir, tmp_path_factory) -> Thresholds:
    """The uninterrupted result on the photos, batches of 2."""
    out = tmp_path_factory.mktemp("full") / "full.safetensors"
    cfg = CalibrationConfig(
        str(photo_dir / "images.json"), MODEL, "none", out=str(out), batch_size=2
    )
    return run_calibration(cfg).thresholds


# 1. images too large to decode safely are bad images, not the end of the run


@pytest.fixture(scope="module")
def with_bomb(photo_dir, tmp_path_factory):
    """The photos, a 196-megapixel PNG (1-bit, 3 MB: PIL refuses it as a decompression bomb)
    and a 1000 x 1000 one, larger than the photos, for the cap."""
    root = tmp_path_factory.mktemp("bomb")
    Image.new("1", (14000, 14000)).save(root / "bomb.png")
    Image.fromarray(np.full((1000, 1000, 3), 90, np.uint8)).save(root / "big.png")
    entries = [{"image": str(photo_dir / "img" / "coffee.jpg")}]
    entries += [{"image": "bomb.png"}, {"image": str(photo_dir / "img" / "moon.jpg")}]
    entries += [{"image": "big.png"}]
    (root / "list.json").write_text(json.dumps(entries))
    return root


def test_decompression_bomb_is_skipped_and_the_cap_can_be_raised(with_bomb, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code, stdout, err = run(find_thresholds_main, calibrate(with_bomb / "list.json", out), capsys)
    assert code == 0, err
    skipped = [json.loads(line) for line in Path(f"{out}.skipped.jsonl").read_text().splitlines()]
    assert [s["key"].split("/")[-1] for s in skipped] == ["bomb.png"]
    assert skipped[0]["reason"].startswith("too large: 196 megapixels")
    assert Thresholds.load(out).metadata["images"] == "3"
    # a cap under 1000 x 1000 skips the big one too; at exactly its size it is kept
    for cap, images in ((999_999, "2"), (1_000_000, "3")):
        code, _, err = run(
            find_thresholds_main,
            calibrate(with_bomb / "list.json", out, "--max-pixels", cap),
            capsys,
        )
        assert code == 0 and Thresholds.load(out).metadata["images"] == images, err


def test_decompression_bomb_is_fatal_only_with_strict(with_bomb, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    args = calibrate(with_bomb / "list.json", out, "--strict", "--batch-size", 1)
    code, _, err = run(find_thresholds_main, args, capsys)
    line = one_line(err)
    assert code == 2 and "bomb.png: too large" in line and "(--strict)" in line
    assert f"progress before batch 1 is in {out}.partial" in line  # the first image is kept
    assert Path(f"{out}.partial").exists() and not out.exists()


def test_encode_reports_a_bad_image_and_goes_on(with_bomb, photo_dir, capsys):
    good = [photo_dir / "img" / "coffee.jpg", photo_dir / "img" / "moon.jpg"]
    images = [good[0], with_bomb / "bomb.png", photo_dir / "img" / "missing.jpg", good[1]]
    args = [*images, "--model", MODEL, "--pretrained", "none", "--r-total", 0]
    code, out, err = run(encode_main, args, capsys)
    assert code == 1 and "Traceback" not in err
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines[:2]] == [str(g) for g in good]
    assert all(line.split()[1] == "65" for line in lines[:2])  # --r-total 0: nothing merges
    assert "bomb.png: too large" in err and "missing.jpg: missing file" in err
    assert err.strip().splitlines()[-1] == f"dymu-encode: 2 of 4 images failed (first: {images[1]})"


# 2. devices that cannot be used are refused before any work


@pytest.mark.parametrize(
    "device,message",
    [
        ("cuda", "--device cuda: no CUDA GPU is available here"),
        ("cuda:2", "--device cuda:2: no CUDA GPU is available here"),
        ("tpu9", "unknown device 'tpu9'"),
        ("meta", "--device meta holds no data"),
    ],
)
def test_unusable_device_is_one_line(photo_dir, tmp_path, capsys, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    out = tmp_path / "t.safetensors"
    args = calibrate(photo_dir / "images.json", out, "--device", device)
    code, _, err = run(find_thresholds_main, args, capsys)
    assert code == 2 and message in one_line(err) and "calibrating" not in err
    code, _, err = run(encode_main, [out, "--device", device], capsys)
    assert code == 2 and message in one_line(err)


def test_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    from dymu.devices import resolve_device
    from dymu.errors import DyMUError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DyMUError, match="this machine has 2 GPU"):
        resolve_device("cuda:2")


# 3. the output location is checked first, and a failed final write loses nothing


def read_only_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in (root ignores permissions: sysfs refuses it too)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("where", ["folder", "read-only", "under a file"])
def test_unwritable_out_is_refused_before_the_first_batch(photo_dir, tmp_path, capsys, where):
    (tmp_path / "file.txt").write_text("x")
    out = {
        "folder": tmp_path,
        "read-only": read_only_folder(tmp_path) / "t.safetensors",
        "under a file": tmp_path / "file.txt" / "t.safetensors",
    }[where]
    code, stdout, err = run(find_thresholds_main, calibrate(photo_dir / "images.json", out), capsys)
    line = one_line(err)
    assert code == 2 and "calibrating" not in err and "note: random" not in stdout
    assert line.startswith(f"{FIND}: error: ") and str(out) in line
    assert not list(tmp_path.glob("**/*.partial")) and not list(tmp_path.glob("**/*.tmp"))


def test_failed_final_write_keeps_everything_for_resume(
    photo_dir, full, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "t.safetensors"

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Thresholds, "save", disk_full)
        code, _, err = run(find_thresholds_main, calibrate(photo_dir / "images.json", out), capsys)
    line = one_line(err)
    assert code == 2 and "No space left on device" in line and "Nothing is lost" in line
    assert Path(f"{out}.partial").exists() and not out.exists()
    code, _, err = run(
        find_thresholds_main, calibrate(photo_dir / "images.json", out, "--resume"), capsys
    )
    assert code == 0, err
    assert same_result(Thresholds.load(out), full) and not Path(f"{out}.partial").exists()


def test_atomic_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    from dymu.thresholds import atomic_save

    def fail(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_save({"x": torch.zeros(2)}, tmp_path / "x.safetensors", {})
    assert list(tmp_path.iterdir()) == []


# 4. SIGTERM is handled like Ctrl-C, under torchrun too

SLOW_RUN = """
import sys, time
import dymu.sources.stream
from dymu.cli import find_thresholds_main

opened = dymu.sources.stream._open
def slow(item, max_pixels):
    time.sleep(0.4)  # room to send the signal mid-run
    return opened(item, max_pixels)
dymu.sources.stream._open = slow
sys.exit(find_thresholds_main(sys.argv[1:]))
"""


def terminate_when(paths: list[Path], proc: subprocess.Popen, limit: float = 120) -> str:
    """Send SIGTERM once every path exists (a checkpoint was written); the process's stderr."""
    start = time.monotonic()
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - start < limit, "no checkpoint appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=limit)
    return err


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_keeps_progress_and_resume_equals_one_run(photo_dir, full, tmp_path, nproc):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_RUN)
    out = tmp_path / "t.safetensors"
    args = calibrate(photo_dir / "images.json", out, "--checkpoint-every", 1)
    args = [*args, "--model-config", str(CONFIGS)]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*launcher, str(script), *args], stderr=subprocess.PIPE, text=True, env=env
    )
    partials = [Path(f"{out}.partial")]
    if nproc > 1:
        partials = [Path(f"{out}.partial.rank{r}") for r in range(2)]
    err = terminate_when(partials, proc)
    ours = [line for line in err.splitlines() if line.startswith(f"{FIND}:")]
    where = partials[0] if nproc == 1 else f"{out}.partial.rank*"
    assert ours == [
        f"{FIND}: terminated (SIGTERM); progress is in {where}: run the same command with --resume"
    ], err
    if nproc == 1:
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert all(p.exists() for p in partials) and not out.exists()
    resumed = subprocess.run(
        [*launcher, "-m", "dymu.cli", *args, "--resume"], capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_result(Thresholds.load(out), full)
    assert not any(p.exists() for p in partials)


# 5. --resume without a checkpoint says so and starts fresh


def test_resume_without_checkpoint_is_a_notice(photo_dir, full, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    args = calibrate(photo_dir / "images.json", out, "--resume")
    code, _, err = run(find_thresholds_main, args, capsys)
    assert code == 0, err
    notice = [line for line in err.splitlines() if "--resume" in line]
    assert notice == [
        f"{FIND}: --resume: no checkpoint {out}.partial yet, starting from the beginning"
    ]
    assert same_result(Thresholds.load(out), full)


# 6. merge refuses inputs that counted the same images


def test_merge_refuses_overlapping_inputs(photo_dir, full, tmp_path, capsys):
    entries = json.loads((photo_dir / "images.json").read_text())
    for name, part in (("a", entries[:6]), ("b", entries[6:])):
        (tmp_path / f"{name}.json").write_text(
            json.dumps([{"image": str(photo_dir / e["image"])} for e in part])
        )
        out = tmp_path / f"{name}.safetensors"
        assert find_thresholds_main(calibrate(tmp_path / f"{name}.json", out)) == 0
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    (tmp_path / "copy.safetensors").write_bytes(a.read_bytes())
    capsys.readouterr()
    merged = tmp_path / "m.safetensors"
    cases = [
        ([a, a], f"cannot merge: {a} is given twice"),
        ([a, b, tmp_path / "copy.safetensors"], "both counted images of"),
    ]
    for parts, message in cases:
        code, _, err = run(find_thresholds_main, ["merge", *parts, "--out", merged], capsys)
        assert code == 2 and message in one_line(err) and not merged.exists()
    code, stdout, err = run(find_thresholds_main, ["merge", a, b, "--out", merged], capsys)
    assert code == 0 and "merged 2 files (12 images)" in stdout, err
    meta = Thresholds.load(merged).metadata
    assert [c["images"] for c in json.loads(meta["covers"])] == [6, 6]
    # the halves' batches are the whole run's: their token counts add up to its count
    whole = float(full.metadata["calibration_tokens_mean"])
    assert abs(float(meta["calibration_tokens_mean"]) - whole) <= 0.01
    assert not any(k.startswith("inference_") for k in meta)  # measured for other thresholds
    code, _, err = run(find_thresholds_main, ["merge", merged, b, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "both counted images of" in one_line(err)


# 9. --show pictures: checked folder, distinct names


def test_show_into_a_file_or_read_only_folder_is_refused(photo_dir, tmp_path, capsys):
    image = photo_dir / "img" / "coffee.jpg"
    (tmp_path / "file.png").write_text("x")
    for target, message in (
        (tmp_path / "file.png", "is a file: give a folder"),
        (read_only_folder(tmp_path), "cannot write --show"),
    ):
        code, out, err = run(
            encode_main,
            [image, "--model", MODEL, "--pretrained", "none", "--r-total", 0, "--show", target],
            capsys,
        )
        assert code == 2 and message in one_line(err) and out == ""


def test_show_gives_images_with_the_same_name_their_own_picture(photo_dir, tmp_path, capsys):
    for folder, name in (("a", "coffee"), ("b", "moon")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes((photo_dir / "img" / f"{name}.jpg").read_bytes())
    images = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"]
    show = tmp_path / "show"
    code, out, err = run(
        encode_main,
        [*images, "--model", MODEL, "--pretrained", "none", "--r-total", 0, "--show", show],
        capsys,
    )
    assert code == 0, err
    pictures = sorted(p.name for p in show.iterdir())
    assert pictures == ["a-x.dymu.png", "b-x.dymu.png"]
    a, b = (np.asarray(Image.open(show / p)) for p in pictures)
    assert not np.array_equal(a, b)  # two photos, two pictures
    assert all(f"-> {show / p}" in out for p in pictures)


# 10. offline with named weights: one line, quickly


@pytest.mark.parametrize("offline", [False, True])
def test_unreachable_weights_host_is_one_quick_line(photo_dir, tmp_path, offline):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="https://127.0.0.1:9")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    image = photo_dir / "img" / "coffee.jpg"
    start = time.monotonic()
    proc = subprocess.run(
        [shutil.which("dymu-encode"), str(image), "--model", "ViT-B-16-tome"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    seconds = time.monotonic() - start
    line = one_line(proc.stderr)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert line.startswith("dymu-encode: error: ") and "--pretrained none" in line
    assert ("HF_HUB_OFFLINE" if offline else "127.0.0.1 is unreachable") in line
    assert seconds < 60  # no retry loop (the hub client's took 52 s)


# 12. threshold files respect the umask


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_threshold_files_respect_the_umask(full, tmp_path, mask, mode):
    previous = os.umask(mask)
    try:
        full.save(tmp_path / "t.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == mode
