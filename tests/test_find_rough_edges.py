"""Rough edges a new user of ``dymu-find-thresholds`` hits (issue 17): each test fails on the
behaviour before the fix."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, TINY, interrupt_after
from safetensors import safe_open

import dymu.calibration.job
from dymu import DyMUError, Thresholds
from dymu.calibration.checkpoint import lock_path, run_lock
from dymu.calibration.job import CalibrationConfig, run_calibration
from dymu.cli import find_thresholds_main
from dymu.cli.find import find_thresholds_parser, merge_parser
from dymu.engine.schedule import make_schedule
from dymu.sources.stream import open_source

MODEL = f"{TINY}-tome-24out"
FIND = "dymu-find-thresholds"
ROOT = Path(__file__).parent.parent


def cli(args, capsys) -> tuple[int, str, str]:
    code = find_thresholds_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line a refused run prints (tqdm's bar lines aside), no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith(FIND)]
    assert len(lines) == 1, err
    return lines[0]


def args(data, out, *extra) -> list[str]:
    base = ["--data", data, "--model", MODEL, "--pretrained", "none", "--batch-size", 2]
    return [str(a) for a in [*base, "--num-workers", 0, "--out", out, *extra]]


def config(data, out, **kw) -> CalibrationConfig:
    kw.setdefault("batch_size", 2)
    kw.setdefault("inference_sample", 0)
    return CalibrationConfig(str(data), MODEL, "none", out=str(out), **kw)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def interrupted(photo_dir, out: Path, after: int = 1, pause: float = 0.0) -> Path:
    """An ``OUT.partial`` from a run stopped by Ctrl-C after ``after`` batches."""
    stop = interrupt_after(after, [])

    def on_batch(batch, tokens):
        time.sleep(pause)
        stop(batch, tokens)

    with pytest.raises(KeyboardInterrupt):
        run_calibration(config(photo_dir / "images.json", out), on_batch=on_batch)
    partial = Path(f"{out}.partial")
    assert partial.exists() and not out.exists()
    return partial


def subset(photo_dir, tmp_path, name: str, images: list[str]) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps([{"image": str(photo_dir / "img" / i)} for i in images]))
    return path


# 1. --schedule takes the spelling --help and model names use


def test_schedule_flag_takes_both_spellings_and_files_record_one(photo_dir, tmp_path, capsys):
    parse = find_thresholds_parser().parse_args
    for spelling in ("reverse-linear", "reverse_linear"):
        assert parse(["--data", "x", "--schedule", spelling]).schedule == "reverse_linear"
    assert make_schedule(40, 4, "reverse-linear") == make_schedule(40, 4, "linear")[::-1]
    flag, name = tmp_path / "flag.safetensors", tmp_path / "name.safetensors"
    small = ["--max-images", 4, "--inference-sample", 0]
    code, _, err = cli(
        [*args(photo_dir / "images.json", flag, *small), "--schedule", "reverse-linear"], capsys
    )
    assert code == 0, err
    named = args(photo_dir / "images.json", name, *small)
    named[named.index(MODEL)] = f"{MODEL}-reverse-linear"
    code, _, err = cli(named, capsys)
    assert code == 0, err
    a, b = Thresholds.load(flag), Thresholds.load(name)
    assert a.metadata["schedule"] == b.metadata["schedule"] == "reverse_linear"
    assert a.r.tolist() == b.r.tolist() == make_schedule(64 - 24, 4, "linear")[::-1]
    assert torch.equal(a.sum, b.sum)


# 2. two runs on one --out cannot destroy each other's progress


def test_a_held_lock_refuses_the_second_run_and_leaves_the_partial(photo_dir, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    partial = interrupted(photo_dir, out)
    before = digest(partial)
    holder = open(tmp_path / "t.safetensors.lock", "a+")  # another run, as the file says
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("pid 4242 on elsewhere\n")
    holder.flush()
    try:
        for extra in ([], ["--resume"]):
            code, _, err = cli(args(photo_dir / "images.json", out, *extra), capsys)
            line = one_line(err)
            assert code == 2 and "another run is writing" in line, line
            assert "pid 4242 on elsewhere" in line and str(out) in line
            assert digest(partial) == before and not out.exists()
    finally:
        holder.close()  # the file stays behind, unlocked: it must not block anyone
    code, _, err = cli(args(photo_dir / "images.json", out, "--resume"), capsys)
    assert code == 0, err
    assert out.exists() and not partial.exists() and not lock_path(out).exists()


SLOW_RUN = """
import sys, time
import dymu.sources.stream
from dymu.cli import find_thresholds_main

opened = dymu.sources.stream._open
def slow(item, max_pixels):
    time.sleep(0.5)
    return opened(item, max_pixels)
dymu.sources.stream._open = slow
sys.exit(find_thresholds_main(sys.argv[1:]))
"""


def test_a_running_run_names_itself_to_a_second_one(photo_dir, tmp_path, capsys):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_RUN)
    out = tmp_path / "t.safetensors"
    run_args = args(photo_dir / "images.json", out, "--checkpoint-every", 1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), *run_args, "--model-config", str(CONFIGS)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    partial = Path(f"{out}.partial")
    try:
        start = time.monotonic()
        while not partial.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() - start < 120, "no checkpoint appeared"
            time.sleep(0.1)
        code, _, err = cli([*run_args, "--resume"], capsys)
        line = one_line(err)
        assert code == 2 and f"pid {proc.pid} on {socket.gethostname()}" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert partial.exists() and proc.returncode == 128 + signal.SIGTERM


def test_locks_are_per_rank_file(tmp_path):
    out = tmp_path / "t.safetensors"
    assert lock_path(out, 0).name == "t.safetensors.lock"
    assert lock_path(out, 1).name == "t.safetensors.rank1.lock"
    with run_lock(out, 1):
        with run_lock(out, 0):  # another rank's file: free
            with pytest.raises(DyMUError, match=rf"pid {os.getpid()} on .*rank1\.lock"):
                with run_lock(out, 1):
                    pass
        assert not lock_path(out, 0).exists()
    assert not lock_path(out, 1).exists()


def test_under_torchrun_a_held_lock_refuses_every_rank(photo_dir, tmp_path):
    """Rank 0 cannot lock OUT.lock (another job holds it); rank 1 could lock its own file,
    but the ranks agree first: both refuse, none counts, no partial is left."""
    out = tmp_path / "t.safetensors"
    holder = open(lock_path(out), "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("pid 4242 on elsewhere\n")
    holder.flush()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [shutil.which("dymu-find-thresholds"), *args(photo_dir / "images.json", out)]
    cmd += ["--model-config", str(CONFIGS)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=tmp_path, timeout=240,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
    finally:
        holder.close()
    assert proc.returncode != 0
    assert "another run is writing" in proc.stderr and "pid 4242 on elsewhere" in proc.stderr
    assert "another rank of this run could not lock" in proc.stderr
    assert not list(tmp_path.glob("t.safetensors.partial*")) and not out.exists()


# 3. a damaged checkpoint says what to do


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no tokens"])
def test_a_damaged_partial_is_one_line_saying_delete_it(photo_dir, tmp_path, capsys, damage):
    out = tmp_path / "t.safetensors"
    partial = interrupted(photo_dir, out)
    if damage == "garbage":
        partial.write_bytes(b"\x00not a checkpoint\n" * 10)
    elif damage == "truncated":
        partial.write_bytes(partial.read_bytes()[:200])
    else:  # a readable file whose metadata lost an entry
        tensors = {"sum": torch.zeros(4, dtype=torch.float64), "count": torch.zeros(4)}
        with safe_open(str(partial), framework="pt") as fh:
            meta = dict(fh.metadata())
        del meta["tokens"]
        from safetensors.torch import save_file

        save_file(tensors, str(partial), metadata=meta)
    code, _, err = cli(args(photo_dir / "images.json", out, "--resume"), capsys)
    line = one_line(err)
    assert code == 2 and f"cannot resume from {partial}" in line and "damaged" in line, line
    assert "delete it" in line and partial.exists()


# 4. problems known up front are reported before the model is built


@pytest.fixture
def no_model(monkeypatch):
    def build(*a, **kw):
        raise AssertionError("the model was built")

    monkeypatch.setattr(dymu.calibration.job, "build_encoder", build)


def test_bad_hf_model_and_empty_data_are_refused_before_the_model(
    photo_dir, tmp_path, capsys, no_model
):
    data = photo_dir / "images.json"
    out = tmp_path / "t.safetensors"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    no_config = tmp_path / "model"
    no_config.mkdir()
    cases = [
        (
            [*args(data, out)[:2], "--hf-model", tmp_path / "missing", "--out", out],
            f"--hf-model {tmp_path / 'missing'}: not found",
        ),
        (
            [*args(data, out)[:2], "--hf-model", no_config, "--out", out],
            f"--hf-model {no_config} is not a transformers model folder (no config.json)",
        ),
        (args(empty, out), f"no images in {empty}"),
    ]
    for argv, message in cases:
        code, _, err = cli(argv, capsys)
        line = one_line(err)
        assert code == 2 and message in line, line
        assert not out.exists()


def test_a_missing_out_folder_is_created(photo_dir, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "t.safetensors"
    code, _, err = cli(args(photo_dir / "images.json", out, "--max-images", 2), capsys)
    assert code == 0, err
    assert Thresholds.load(out).metadata["images"] == "2"
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Threshold finding at scale")[1].split("\n## ")[0]
    assert "a missing\n  folder is created" in section


# 5. the inference-sample pass has a progress bar


def test_the_inference_sample_pass_has_its_own_bar(photo_dir, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    extra = ["--max-images", 6, "--inference-sample", 4]
    code, _, err = cli(args(photo_dir / "images.json", out, *extra), capsys)
    assert code == 0, err
    assert re.search(r"calibrating: 100%.*6/6", err), err
    assert re.search(r"inference sample: 100%.*4/4", err), err
    assert Thresholds.load(out).metadata["inference_images"] == "4"


def test_on_sample_counts_to_the_images_encoded(photo_dir, tmp_path):
    seen: list[tuple[int, int]] = []
    cfg = config(photo_dir / "images.json", tmp_path / "t.safetensors", batch_size=5)
    cfg.inference_sample = 256  # more than the 12 photos: the total is what there is
    res = run_calibration(cfg, on_sample=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 12), (5, 12), (10, 12), (12, 12)]
    assert res.thresholds.metadata["inference_images"] == "12"


# 6. merge does not overwrite without --force


def test_merge_needs_force_to_overwrite(photo_dir, tmp_path, capsys):
    names = sorted(p.name for p in (photo_dir / "img").iterdir())
    parts = []
    for i, chunk in enumerate([names[:2], names[2:4]]):
        part = tmp_path / f"part{i}.safetensors"
        run_calibration(config(subset(photo_dir, tmp_path, f"s{i}", chunk), part))
        parts.append(part)
    out = tmp_path / "all.safetensors"
    out.write_bytes(b"precious")
    code, _, err = cli(["merge", *parts, "--out", out], capsys)
    line = one_line(err)
    assert code == 2 and f"--out {out} exists" in line and "--force" in line, line
    assert out.read_bytes() == b"precious"
    code, _, err = cli(["merge", *parts, "--out", out, "--force"], capsys)
    assert code == 0, err
    merged = Thresholds.load(out)
    expected = Thresholds.load(parts[0]).sum + Thresholds.load(parts[1]).sum
    assert merged.metadata["images"] == "4" and torch.equal(merged.sum, expected)
    assert "--force" in merge_parser().format_help()


# 7. elapsed time after --resume counts the whole run


def test_elapsed_time_after_resume_includes_the_interrupted_part(photo_dir, tmp_path):
    out = tmp_path / "t.safetensors"
    partial = interrupted(photo_dir, out, after=1, pause=2.0)
    with safe_open(str(partial), framework="pt") as fh:
        earlier = float(fh.metadata()["seconds"])
    assert earlier >= 2.0
    start = time.perf_counter()
    res = run_calibration(config(photo_dir / "images.json", out, resume=True))
    wall = time.perf_counter() - start
    assert earlier <= res.seconds <= earlier + wall
    assert res.seconds > wall  # more than this process alone could have measured


# 8. Hugging Face datasets: save_to_disk folders under hf:, and no hub retries offline


@pytest.fixture(scope="module")
def saved(photo_dir, tmp_path_factory):
    """Four photos saved with ``save_to_disk`` as a Dataset and as a DatasetDict."""
    import datasets

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("saved")
    names = sorted(p.name for p in (photo_dir / "img").iterdir())[:4]
    rows = [{"bytes": (photo_dir / "img" / n).read_bytes(), "path": None} for n in names]
    features = datasets.Features({"photo": datasets.Image()})
    ds = datasets.Dataset.from_dict({"photo": rows}, features=features)
    ds.save_to_disk(root / "one")
    datasets.DatasetDict({"train": ds, "val": ds.select(range(1))}).save_to_disk(root / "dict")
    return root, names, rows


def test_hf_prefix_loads_save_to_disk_folders(saved, photo_dir, tmp_path):
    root, names, rows = saved
    one = open_source(f"hf:{root / 'one'}")
    assert len(one) == 4 and [i.data for i in one] == [r["bytes"] for r in rows]
    assert len(open_source(f"hf:{root / 'dict'}:val")) == 1
    assert len(open_source(f"hf:{root / 'dict'}")) == 4  # the train split
    with pytest.raises(DyMUError, match=r"has no split 'test' \(train, val\)$"):
        open_source(f"hf:{root / 'dict'}:test")
    res = run_calibration(config(f"hf:{root / 'one'}", tmp_path / "hf.safetensors"))
    same = run_calibration(
        config(subset(photo_dir, tmp_path, "s", names), tmp_path / "json.safetensors")
    )
    assert torch.equal(res.thresholds.sum, same.thresholds.sum)


@pytest.mark.parametrize("offline", [False, True])
def test_an_unreachable_hub_dataset_is_one_quick_line(tmp_path, offline):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    argv = args("hf:someone/some-photos", tmp_path / "t.safetensors", "--model-config", CONFIGS)
    start = time.monotonic()
    proc = subprocess.run(
        [shutil.which(FIND), *argv], capture_output=True, text=True, env=env, timeout=120
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"{FIND}: error: cannot load hf:someone/some-photos: "), line
    assert ("HF_HUB_OFFLINE is set" if offline else "127.0.0.1 is unreachable") in line
    assert seconds < 15, seconds  # the hub client's retries took 25 s


# 9. the README renders, and points at nothing outside the repository


def test_readme_fences_close_and_no_outside_design_notes():
    readme = (ROOT / "README.md").read_text()
    fences = [line for line in readme.splitlines() if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0
    assert all(re.fullmatch(r"\s*```\w*", line) for line in fences), fences
    assert "give its folder instead of a name:\n\n```bash" in readme
    sources = [ROOT / "README.md", *(ROOT / "dymu").rglob("*.py")]
    assert not [p for p in sources if "DESIGN" in p.read_text() or "shared/" in p.read_text()]
