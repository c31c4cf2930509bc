"""Two runs on one ``--out`` cannot destroy each other's progress, and a damaged checkpoint
says what to do (issue 17's rough edges 2 and 3; each test fails on the behaviour before the
fix)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from find_cli import args, cli, digest, interrupted, one_line
from safetensors import safe_open

from dymu import DyMUError
from dymu.calibration.checkpoint import lock_path, run_lock

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
