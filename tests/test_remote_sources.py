"""Data where it lives: webdataset shards through pipes and HTTP, Hugging Face datasets, parquet.

Every source is checked against a JSON list of the same JPEG files in the same order: the
same images in the same batches give the same thresholds, bit for bit.
"""

import http.server
import io
import json
import sys
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import PHOTOS, TINY, interrupt_after

from dymu import DyMUError
from dymu.calibration.job import CalibrationConfig, run_calibration
from dymu.sources.stream import ImageStream, iterate_batches, open_source

MODEL = f"{TINY}-tome-24out"


def config(data, out, **kw) -> CalibrationConfig:
    kw.setdefault("batch_size", 4)
    kw.setdefault("inference_sample", 0)  # no second pass over the data (faster)
    return CalibrationConfig(data=str(data), model=MODEL, pretrained="none", out=str(out), **kw)


def calibrate(data, tmp_path, name, **kw):
    return run_calibration(config(data, tmp_path / f"{name}.safetensors", **kw))


@pytest.fixture(scope="module")
def files(photos, tmp_path_factory):
    """The 12 photos as JPEG files, a JSON list of them, and two webdataset shards."""
    root = tmp_path_factory.mktemp("remote")
    jpegs = []
    for i, img in enumerate(photos):
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
        (root / f"{i:02d}.jpg").write_bytes(jpegs[-1])
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w") as tar:
            for i in range(shard * 6, shard * 6 + 6):
                for ext, payload in (("jpg", jpegs[i]), ("txt", PHOTOS[i].encode())):
                    info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return SimpleNamespace(root=root, jpegs=jpegs, json=json_list(root, range(12)))


def json_list(root: Path, order, name: str = "list.json") -> Path:
    """A JSON list of the photo files in ``order``; None stands for a missing file."""
    entries = [{"image": f"{i:02d}.jpg" if i is not None else "missing.jpg"} for i in order]
    (root / name).write_text(json.dumps(entries))
    return root / name


@pytest.fixture(scope="module")
def server(files):
    """An HTTP server on 127.0.0.1 serving the shard folder; it records the paths asked for."""
    asked = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(files.root), **kw)

        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", asked=asked)
    httpd.shutdown()
    httpd.server_close()


def mean_value(image) -> torch.Tensor:
    return torch.tensor([float(np.asarray(image).mean())])


def stream(spec, workers: int) -> list:
    """(batch, image means, skipped items) of a source (or spec) as calibration groups it."""
    images = ImageStream(open_source(spec) if isinstance(spec, str) else spec, mean_value)
    return [
        (b.index, [] if b.pixels is None else b.pixels.flatten().tolist(), b.skipped)
        for b in iterate_batches(images, 4, workers)
    ]


def test_pipe_and_http_shards_give_the_thresholds_of_local_ones(files, server, tmp_path):
    root = files.root
    local = calibrate(root / "shard-{000..001}.tar", tmp_path, "local").thresholds
    assert torch.equal(local.sum, calibrate(files.json, tmp_path, "json").thresholds.sum)
    for spec in (f"pipe:cat {root}/shard-{{000..001}}.tar", f"{server.url}/shard-{{000..001}}.tar"):
        for workers in (0, 2):
            res = calibrate(spec, tmp_path, f"w{workers}", num_workers=workers)
            assert torch.equal(res.thresholds.sum, local.sum), (spec, workers)
            assert res.thresholds.metadata["images"] == "12" and not res.skipped


def test_streamed_items_are_the_shard_bytes(files, server):
    """Items carry the bytes; with two workers each remote shard is downloaded once a pass."""
    for spec in (
        f"pipe:cat {files.root}/shard-{{000..001}}.tar",
        f"{server.url}/shard-{{000..001}}.tar",
    ):
        items = list(open_source(spec))
        assert [item.data for item in items] == files.jpegs
        assert items[0].key == spec.replace("{000..001}", "000") + ":sample0000"
    source = open_source(f"{server.url}/shard-{{000..001}}.tar")
    server.asked.clear()
    one, two, again = stream(source, 0), stream(source, 2), stream(source, 2)
    assert one == two == again and [len(means) for _, means, _ in one] == [4, 4, 4]
    # one download a shard and a pass: two workers share it through the spool
    assert sorted(server.asked) == [f"/shard-00{i}.tar" for i in (0, 1) for _ in range(3)]
    assert not list(source.spool.root.iterdir())  # each copy deleted once both had read it


def test_failing_shards_are_reported_in_place(files, server, tmp_path):
    """A failing pipe command, a 404, a pipe cut short and one that exits non-zero."""
    root = files.root
    spec = "::".join(
        [
            f"pipe:cat {root}/shard-000.tar",
            f"pipe:cat {root}/no-such-shard.tar",
            f"{server.url}/no-such-shard.tar",
            f"{server.url}/shard-001.tar",
        ]
    )
    expected = calibrate(
        json_list(root, [*range(6), None, None, *range(6, 12)], "gaps.json"), tmp_path, "gaps"
    )
    for workers in (0, 2):
        res = calibrate(spec, tmp_path, f"w{workers}", num_workers=workers)
        assert [s["index"] for s in res.skipped] == [6, 7]
        pipe, url = (s["reason"] for s in res.skipped)
        assert pipe.startswith(f"broken shard: `cat {root}/no-such-shard.tar` exited with status 1")
        assert "No such file" in pipe and url == "broken shard: HTTP Error 404: File not found"
        assert torch.equal(res.thresholds.sum, expected.thresholds.sum)
    with tarfile.open(root / "shard-001.tar") as tar:
        cut = tar.getmember("sample0008.jpg").offset_data + 100  # inside the third image
    spec = f"pipe:head -c {cut} {root}/shard-001.tar::pipe:cat {root}/shard-000.tar; exit 3"
    one, two = stream(spec, 0), stream(spec, 2)
    assert one == two
    reasons = [(i.index, i.reason) for _, _, skipped in one for i in skipped]
    assert reasons[0] == (2, "broken shard: unexpected end of data")
    assert reasons[1] == (
        9,
        f"broken shard: `cat {root}/shard-000.tar; exit 3` exited with status 3",
    )
    assert sum(len(means) for _, means, _ in one) == 8  # 2 before the cut, all 6 of the other


def test_missing_fsspec_backends_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(DyMUError) as err:
        open_source("s3://bucket/train-{000..009}.tar")
    assert str(err.value) == "s3:// shards need fsspec and s3fs: pip install fsspec s3fs"
    monkeypatch.undo()
    import fsspec  # noqa: F401  (the test extra installs it; only gcsfs is missing)

    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(
        DyMUError, match=r"^gs:// shards need fsspec and gcsfs: pip install fsspec gcsfs$"
    ):
        open_source("gs://bucket/train-000.tar")


@pytest.fixture(scope="module")
def tables(files, tmp_path_factory):
    """The photos as a Hugging Face dataset (an ``Image`` column after a caption), saved with
    ``save_to_disk``, as one parquet file, as a folder of two, and as plain parquet."""
    import datasets  # the test extra installs it (the data extra for users)
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("tables")
    features = datasets.Features({"caption": datasets.Value("string"), "photo": datasets.Image()})

    def dataset(images):
        rows = [None if b is None else {"bytes": b, "path": None} for b in images]
        return datasets.Dataset.from_dict(
            {"caption": [f"row {i}" for i in range(len(rows))], "photo": rows}, features=features
        )

    ds = dataset(files.jpegs)
    ds.save_to_disk(root / "saved")
    ds.to_parquet(root / "all.parquet")
    (root / "folder").mkdir()
    ds.select(range(7)).to_parquet(root / "folder" / "train-00000-of-00002.parquet")
    ds.select(range(7, 12)).to_parquet(root / "folder" / "train-00001-of-00002.parquet")
    # no Hugging Face metadata: the binary column is found by its name
    pq.write_table(pa.table({"caption": PHOTOS, "jpg": files.jpegs}), root / "plain.parquet")
    pq.write_table(pa.table({"caption": PHOTOS}), root / "captions.parquet")
    dataset([*files.jpegs[:2], None, *files.jpegs[2:8]]).save_to_disk(root / "holes")
    return root


def test_datasets_give_the_thresholds_of_the_json_list(files, tables, tmp_path):
    expected = calibrate(files.json, tmp_path, "json").thresholds
    specs = {
        "saved": str(tables / "saved"),
        "parquet": str(tables / "all.parquet"),
        "folder": str(tables / "folder"),
        "glob": str(tables / "folder" / "*.parquet"),
        "plain": str(tables / "plain.parquet"),
        "hub loader": f"hf:{tables / 'folder'}",
    }
    for kind, spec in specs.items():
        res = calibrate(spec, tmp_path, kind)
        assert torch.equal(res.thresholds.sum, expected.sum), kind
        assert res.thresholds.metadata["images"] == "12" and not res.skipped
    explicit = calibrate(specs["plain"], tmp_path, "explicit", image_column="jpg", num_workers=2)
    assert torch.equal(explicit.thresholds.sum, expected.sum)
    # streamed through datasets, two workers still see the whole dataset each
    hub = calibrate(f"hf:{tables / 'folder'}:train", tmp_path, "hub2", num_workers=2)
    assert torch.equal(hub.thresholds.sum, expected.sum)


def test_dataset_sources_have_lengths_and_keys(tables):
    saved, parquet = open_source(str(tables / "saved")), open_source(str(tables / "folder"))
    assert len(saved) == len(parquet) == 12
    assert [i.key for i in saved][:2] == [f"{tables / 'saved'}#0", f"{tables / 'saved'}#1"]
    second = tables / "folder" / "train-00001-of-00002.parquet"
    assert [i.key for i in parquet][7] == f"{second}#0"
    hub = open_source(f"hf:{tables / 'folder'}")
    assert not hasattr(hub, "__len__") and next(iter(hub)).key == f"hf:{tables / 'folder'}:train#0"


def test_rows_without_an_image_are_reported(files, tables, tmp_path):
    res = calibrate(tables / "holes", tmp_path, "holes")
    assert res.skipped == [{"index": 2, "key": f"{tables / 'holes'}#2", "reason": "no image"}]
    same = calibrate(json_list(files.root, [0, 1, None, *range(2, 8)], "holes.json"), tmp_path, "j")
    assert torch.equal(res.thresholds.sum, same.thresholds.sum)


def test_image_column_errors_are_one_line(files, tables):
    with pytest.raises(DyMUError, match=r"^--image-column is for Hugging Face datasets"):
        open_source(str(files.json), image_column="photo")
    with pytest.raises(DyMUError, match=r"has no column 'picture' \(columns: caption, jpg\)$"):
        open_source(str(tables / "plain.parquet"), image_column="picture")
    with pytest.raises(DyMUError, match=r"no image column found \(columns: caption\); name it"):
        open_source(str(tables / "captions.parquet"))
    with pytest.raises(DyMUError, match=r"^no parquet files match"):
        open_source(str(tables / "nothing-*.parquet"))


def test_interrupted_dataset_run_resumes_to_the_same_thresholds(tables, tmp_path):
    spec = tables / "saved"
    full = calibrate(spec, tmp_path, "full", batch_size=2)
    out = tmp_path / "t.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run_calibration(
            config(spec, out, batch_size=2, checkpoint_every=2), on_batch=interrupt_after(3, [])
        )
    seen = []
    res = run_calibration(
        config(spec, out, batch_size=2, resume=True), on_batch=lambda b, t: seen.append(b.index)
    )
    assert seen == [3, 4, 5]
    assert torch.equal(res.thresholds.sum, full.thresholds.sum)
    assert torch.equal(res.thresholds.count, full.thresholds.count)


def test_missing_datasets_packages_are_named(tables, monkeypatch):
    for module, spec in (
        ("datasets", tables / "saved"),
        ("datasets", f"hf:{tables / 'folder'}"),
        ("pyarrow.parquet", tables / "all.parquet"),
    ):
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(DyMUError) as err:
            open_source(str(spec))
        package = module.split(".")[0]
        assert str(err.value) == f"reading {spec} needs {package}: pip install 'dymu[data]'"
        monkeypatch.undo()
