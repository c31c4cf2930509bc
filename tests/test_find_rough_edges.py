"""Rough edges a new user of ``dymu-find-thresholds`` hits (issue 17): each test fails on the
behaviour before the fix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest
import torch
from conftest import CONFIGS
from find_cli import FIND, MODEL, ROOT, args, cli, config, interrupted, one_line, subset
from safetensors import safe_open

import dymu.calibration.job
from dymu import DyMUError, Thresholds
from dymu.calibration.job import run_calibration
from dymu.cli.find import find_thresholds_parser, merge_parser
from dymu.engine.schedule import make_schedule
from dymu.sources.stream import open_source

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
