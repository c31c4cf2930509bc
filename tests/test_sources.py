"""Threshold finding at scale: sources, bad data, resume, torchrun, merging, converting."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, PHOTOS, TINY, interrupt_after, run_cli
from PIL import Image

import dymu
from dymu import Thresholds
from dymu.calibration.job import CalibrationConfig, run_calibration
from dymu.cli import find_thresholds_main
from dymu.sources.stream import open_source

MODEL = f"{TINY}-tome-24out"


def config(data, out, **kw) -> CalibrationConfig:
    kw.setdefault("batch_size", 4)
    return CalibrationConfig(data=str(data), model=MODEL, pretrained="none", out=str(out), **kw)


@pytest.fixture(scope="module")
def sources(photos, tmp_path_factory):
    """The same 12 photos as a JSON list, a folder and two webdataset shards, same order."""
    root = tmp_path_factory.mktemp("sources")
    folder = root / "folder" / "sub"
    folder.mkdir(parents=True)
    entries = []
    for i, (name, img) in enumerate(zip(PHOTOS, photos, strict=True)):
        fname = f"{i:02d}_{name}.jpg"
        img.save(folder / fname)
        entries.append({"image": f"folder/sub/{fname}"})
    (root / "list.json").write_text(json.dumps(entries))
    for shard, suffix in ((s, sfx) for s in range(2) for sfx in ("tar", "tar.gz")):
        with tarfile.open(
            root / f"shard-{shard:03d}.{suffix}", "w:gz" if "gz" in suffix else "w"
        ) as tar:
            for i in range(shard * 6, shard * 6 + 6):
                data = (folder / f"{i:02d}_{PHOTOS[i]}.jpg").read_bytes()
                for ext, payload in (("jpg", data), ("txt", PHOTOS[i].encode())):
                    info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return {
        "json": root / "list.json",
        "folder": root / "folder",
        "shards": str(root / "shard-{000..001}.tar"),
        "gzipped shards": str(root / "shard-{000..001}.tar.gz"),
    }


def test_shard_bytes_are_read_only_by_the_decoder(sources):
    """A plain tar yields (offset, size) spans, not bytes; a gzipped one must be read."""
    folder = Path(sources["folder"]) / "sub"
    originals = [(folder / f"{i:02d}_{name}.jpg").read_bytes() for i, name in enumerate(PHOTOS)]
    plain = list(open_source(sources["shards"]))
    assert all(item.data is None and item.span is not None for item in plain)
    assert [item.read() for item in plain] == originals
    gzipped = list(open_source(sources["gzipped shards"]))
    assert [item.data for item in gzipped] == originals


def test_three_sources_give_the_same_thresholds(sources, tmp_path):
    results = {}
    for kind, data in sources.items():
        res = run_calibration(config(data, tmp_path / f"{kind}.safetensors"))
        results[kind] = res.thresholds
        assert res.thresholds.metadata["images"] == "12" and res.thresholds.count[0] == 3
    assert torch.equal(results["json"].sum, results["folder"].sum)
    assert torch.equal(results["json"].sum, results["shards"].sum)
    assert torch.equal(results["json"].sum, results["gzipped shards"].sum)
    # worker processes decode in parallel but the stream order, and so the result, is kept
    two = run_calibration(config(sources["shards"], tmp_path / "w.safetensors", num_workers=2))
    assert torch.equal(two.thresholds.sum, results["json"].sum)


def test_max_images_and_shuffle(sources, tmp_path):
    res = run_calibration(config(sources["json"], tmp_path / "a.safetensors", max_images=8))
    assert res.thresholds.metadata["images"] == "8" and res.thresholds.count[0] == 2
    a = run_calibration(config(sources["json"], tmp_path / "b.safetensors", shuffle_seed=3))
    b = run_calibration(config(sources["folder"], tmp_path / "c.safetensors", shuffle_seed=3))
    plain = run_calibration(config(sources["json"], tmp_path / "d.safetensors"))
    assert torch.equal(a.thresholds.sum, b.thresholds.sum)
    assert not torch.equal(a.thresholds.sum, plain.thresholds.sum)


@pytest.fixture(scope="module")
def messy(photos, tmp_path_factory):
    """Photos mixed with a corrupt, a zero-byte, a truncated and a missing file, a CMYK JPEG
    and a 16-bit PNG (the last two are converted, not skipped)."""
    root = tmp_path_factory.mktemp("messy")
    names = []
    for i, img in enumerate(photos[:6]):
        img.save(root / f"p{i}.jpg")
        names.append(f"p{i}.jpg")
    (root / "corrupt.jpg").write_bytes(os.urandom(2000))
    (root / "zero.jpg").write_bytes(b"")
    full = io.BytesIO()
    photos[6].save(full, format="JPEG")
    (root / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    photos[7].convert("CMYK").save(root / "cmyk.jpg")
    deep = np.asarray(photos[8].convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(root / "deep16.png")
    assert Image.open(root / "deep16.png").mode.startswith("I")
    # batch of 4: [p0 p1 corrupt p2] [zero p3 missing cmyk] [p4 truncated deep16 p5]
    order = [
        "p0.jpg",
        "p1.jpg",
        "corrupt.jpg",
        "p2.jpg",
        "zero.jpg",
        "p3.jpg",
        "missing.jpg",
        "cmyk.jpg",
        "p4.jpg",
        "truncated.jpg",
        "deep16.png",
        "p5.jpg",
    ]
    (root / "list.json").write_text(json.dumps([{"image": n} for n in order]))
    return root, order


def test_bad_data_is_counted_and_reported(messy, tmp_path):
    root, order = messy
    out = tmp_path / "t.safetensors"
    res = run_calibration(config(root / "list.json", out))
    reasons = {Path(s["key"]).name: s["reason"] for s in res.skipped}
    assert sorted(reasons) == ["corrupt.jpg", "missing.jpg", "truncated.jpg", "zero.jpg"]
    assert reasons["missing.jpg"] == "missing file" and reasons["zero.jpg"] == "empty file"
    assert reasons["truncated.jpg"] == "truncated"
    report = [json.loads(line) for line in open(f"{out}.skipped.jsonl")]
    assert [r["index"] for r in report] == [2, 4, 6, 9]
    assert res.thresholds.metadata["images"] == "8"
    # skips never shift batches: the same as calibrating the surviving images of each batch
    enc = dymu.build_encoder(MODEL)
    from dymu.sources.stream import load_rgb

    def batch(names):
        return torch.stack([enc.preprocess(load_rgb(root / n)) for n in names])

    expected = dymu.find_thresholds(
        enc,
        [
            batch(["p0.jpg", "p1.jpg", "p2.jpg"]),
            batch(["p3.jpg", "cmyk.jpg"]),
            batch(["p4.jpg", "deep16.png", "p5.jpg"]),
        ],
    )
    assert torch.equal(res.thresholds.sum, expected.sum)


def test_strict_stops_at_the_first_bad_image(messy, tmp_path, capsys):
    root, _ = messy
    code = find_thresholds_main(
        [
            "--data",
            str(root / "list.json"),
            "--model",
            MODEL,
            "--pretrained",
            "none",
            "--batch-size",
            "4",
            "--strict",
            "--num-workers",
            "0",
            "--out",
            str(tmp_path / "t.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "corrupt.jpg" in err.strip().splitlines()[-1]
    assert not (tmp_path / "t.safetensors").exists()


def test_interrupt_and_resume_gives_identical_thresholds(sources, tmp_path):
    full = run_calibration(config(sources["json"], tmp_path / "full.safetensors", batch_size=2))
    out = tmp_path / "t.safetensors"
    stop_after_three = interrupt_after(3, [])

    with pytest.raises(KeyboardInterrupt):
        run_calibration(
            config(sources["json"], out, batch_size=2, checkpoint_every=2),
            on_batch=stop_after_three,
        )
    assert Path(f"{out}.partial").exists() and not out.exists()
    with pytest.raises(dymu.DyMUError, match="pass --resume"):
        run_calibration(config(sources["json"], out, batch_size=2))
    with pytest.raises(dymu.DyMUError, match="batch_size was '2', now '3'"):
        run_calibration(config(sources["json"], out, batch_size=3, resume=True))
    resumed_batches = []
    res = run_calibration(
        config(sources["json"], out, batch_size=2, resume=True),
        on_batch=lambda b, t: resumed_batches.append(b.index),
    )
    assert resumed_batches == [3, 4, 5]  # continued where it stopped, nothing twice
    assert torch.equal(res.thresholds.sum, full.thresholds.sum)
    assert torch.equal(res.thresholds.count, full.thresholds.count)
    assert res.tokens == full.tokens and not Path(f"{out}.partial").exists()


def test_torchrun_two_processes_equal_one(messy, tmp_path):
    root, _ = messy
    common = [
        "--data",
        root / "list.json",
        "--model",
        MODEL,
        "--pretrained",
        "none",
        "--batch-size",
        "2",
        "--num-workers",
        "1",
        "--model-config",
        CONFIGS,
    ]
    run_cli([*common, "--out", tmp_path / "one.safetensors"], tmp_path)
    proc = run_cli([*common, "--out", tmp_path / "two.safetensors"], tmp_path, nproc=2)
    one = Thresholds.load(tmp_path / "one.safetensors")
    two = Thresholds.load(tmp_path / "two.safetensors")
    assert torch.equal(one.count, two.count) and one.count[0] == 6  # every batch has a good image
    assert torch.allclose(one.sum, two.sum, rtol=0, atol=1e-12)
    assert two.metadata["images"] == one.metadata["images"] == "8"
    assert (tmp_path / "two.safetensors.skipped.jsonl").read_text() == (
        tmp_path / "one.safetensors.skipped.jsonl"
    ).read_text()
    assert proc.stdout.count("wrote") == 1  # only rank 0 reports and writes


def test_merging_partial_files_equals_one_run(sources, tmp_path, capsys):
    folder = Path(sources["json"]).parent
    entries = json.loads(Path(sources["json"]).read_text())
    for name, part in (("a", entries[:8]), ("b", entries[8:])):
        (folder / f"{name}.json").write_text(json.dumps(part))
        run_calibration(config(folder / f"{name}.json", tmp_path / f"{name}.safetensors"))
    whole = run_calibration(config(sources["json"], tmp_path / "whole.safetensors"))
    code = find_thresholds_main(
        [
            "merge",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            "--out",
            str(tmp_path / "m.safetensors"),
        ]
    )
    assert code == 0
    merged = Thresholds.load(tmp_path / "m.safetensors")
    assert torch.equal(merged.count, whole.thresholds.count)
    assert torch.allclose(merged.sum, whole.thresholds.sum, rtol=0, atol=1e-12)
    assert merged.metadata["images"] == "12"
    other = run_calibration(config(folder / "b.json", tmp_path / "c.safetensors", batch_size=2))
    code = find_thresholds_main(
        [
            "merge",
            str(tmp_path / "a.safetensors"),
            str(other.thresholds and tmp_path / "c.safetensors"),
            "--out",
            str(tmp_path / "bad.safetensors"),
        ]
    )
    assert code == 2 and "batch_size differs ('4' vs '2')" in capsys.readouterr().err


def test_convert_reference_checkpoint(tmp_path, capsys):
    values = [0.91, 0.93, 1.0, 0.88]
    state = {
        f"module.visual.transformer.resblocks.{i}.threshold": torch.tensor(v)
        for i, v in enumerate(values)
    }
    state["module.visual.conv1.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ref.pth")
    out = tmp_path / "c.safetensors"
    args = [
        "convert",
        str(tmp_path / "ref.pth"),
        "--model",
        MODEL,
        "--out",
        str(out),
        "--model-config",
        str(CONFIGS),
    ]
    assert find_thresholds_main(args) == 0
    th = Thresholds.load(out)
    assert th.thresholds.tolist() == pytest.approx(values)
    assert th.merging_blocks()[2] is None  # the reference's 1.0: never merges
    assert th.metadata["model"] == MODEL and th.r.tolist() == [10, 10, 10, 10]
    enc = dymu.load_encoder(MODEL, thresholds=out)
    assert enc.thresholds is not None
    torch.save({f"blocks.{i}.threshold": torch.tensor(0.9) for i in range(6)}, tmp_path / "b.pth")
    args[1] = str(tmp_path / "b.pth")
    assert find_thresholds_main(args) == 2
    assert "thresholds for 6 blocks" in capsys.readouterr().err


def test_low_precision_calibration_keeps_float64_statistics(sources, tmp_path):
    res = run_calibration(config(sources["json"], tmp_path / "t.safetensors", dtype="bf16"))
    assert res.thresholds.sum.dtype == torch.float64
    assert res.thresholds.metadata["dtype"] == "bf16"
    assert ((res.thresholds.thresholds > 0) & (res.thresholds.thresholds <= 1)).all()


def test_broken_shards_are_reported_not_fatal(photos, tmp_path):
    """A sample without an image, a shard cut inside an image, and a file that is no tar."""
    jpg = io.BytesIO()
    photos[0].save(jpg, format="JPEG")
    members = [("s0.jpg", jpg.getvalue()), ("s1.txt", b"caption only"), ("s2.jpg", jpg.getvalue())]
    with tarfile.open(tmp_path / "good.tar", "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(tmp_path / "good.tar") as tar:
        cut = tar.getmember("s2.jpg").offset_data + 100  # inside s2's data
    (tmp_path / "cut.tar").write_bytes((tmp_path / "good.tar").read_bytes()[:cut])
    (tmp_path / "junk.tar").write_bytes(b"not a tar " * 100)
    reasons = {}
    for name in ("good", "cut", "junk"):
        source = open_source(str(tmp_path / f"{name}.tar"))
        stream = dymu.sources.stream.ImageStream(source, lambda im: 0)
        reasons[name] = [item.reason for item in stream]
    assert reasons["good"] == [None, "no image in sample (keys: txt)", None]
    assert reasons["cut"][:2] == reasons["good"][:2] and len(reasons["cut"]) == 3
    assert reasons["cut"][2].startswith("broken shard")
    assert len(reasons["junk"]) == 1 and reasons["junk"][0].startswith("broken shard")


def test_each_rank_gets_its_own_gpu(monkeypatch):
    from dymu.devices import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda") == "cuda:3"  # a bare cuda under torchrun: this rank's GPU
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
    assert resolve_device(None) == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
