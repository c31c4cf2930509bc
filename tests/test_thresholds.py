"""The safetensors format: round trip, validation messages, merging partial results."""

import pytest
import torch
from safetensors.torch import save_file

from dymu import DyMUError, Thresholds, make_schedule

META = {
    "model": "ViT-B-16-tome",
    "pretrained": "openai",
    "schedule": "constant",
    "r_total": "64",
    "batch_size": "8",
    "images": "16",
}


def make(images: int = 16, scale: float = 1.0) -> Thresholds:
    s = torch.tensor([1.2, 2.4, 0.0, 3.0], dtype=torch.float64) * scale
    c = torch.tensor([2, 4, 0, 5])
    return Thresholds(s, c, torch.tensor([3, 3, 0, 2]), dict(META, images=str(images)))


def test_round_trip(tmp_path):
    th = make()
    th.save(tmp_path / "t.safetensors")
    back = Thresholds.load(tmp_path / "t.safetensors")
    assert torch.equal(back.sum, th.sum) and torch.equal(back.count, th.count)
    assert torch.equal(back.r, th.r)
    assert back.thresholds.tolist() == pytest.approx([0.6, 0.6, 1.0, 0.6])
    assert back.metadata["format"] == "dymu-thresholds/1"
    assert back.metadata["model"] == "ViT-B-16-tome" and "created" in back.metadata
    assert back.merging_blocks() == pytest.approx([0.6, 0.6, None, 0.6])


def test_merge_adds_statistics():
    merged = make(10).merge(make(6, scale=2.0))
    assert merged.count.tolist() == [4, 8, 0, 10]
    assert merged.thresholds.tolist() == pytest.approx([0.9, 0.9, 1.0, 0.9])
    assert merged.metadata["images"] == "16"
    other = make()
    other.metadata["pretrained"] = "laion2b"
    with pytest.raises(DyMUError, match="pretrained differs"):
        make().merge(other)


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def test_validation_errors_name_the_problem(tmp_path):
    good = {
        "thresholds": torch.tensor([0.5, 0.6]),
        "sum": torch.tensor([0.5, 0.6]).double(),
        "count": torch.tensor([1, 1]),
        "r": torch.tensor([2, 2]),
    }
    fmt = {"format": "dymu-thresholds/1", "model": "ViT-B-16-tome"}
    with pytest.raises(DyMUError, match="not found"):
        Thresholds.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_text("hello")
    with pytest.raises(DyMUError, match="not a dymu thresholds file"):
        Thresholds.load(tmp_path / "junk.safetensors")
    p = _write(tmp_path / "a.safetensors", good, {"model": "x"})
    with pytest.raises(DyMUError, match="not a dymu thresholds file"):
        Thresholds.load(p)
    p = _write(tmp_path / "b.safetensors", {k: v for k, v in good.items() if k != "r"}, fmt)
    with pytest.raises(DyMUError, match="no 'r' tensor"):
        Thresholds.load(p)
    bad = dict(good, thresholds=torch.tensor([0.5, float("nan")]), count=torch.tensor([0, 0]))
    with pytest.raises(DyMUError, match="block 1 is nan"):
        Thresholds.load(_write(tmp_path / "c.safetensors", bad, fmt))
    bad = dict(good, thresholds=torch.tensor([-1.5, 0.5]), count=torch.tensor([0, 0]))
    with pytest.raises(DyMUError, match="block 0 is -1.5"):
        Thresholds.load(_write(tmp_path / "d.safetensors", bad, fmt))
    bad = dict(good, r=torch.tensor([1, 2, 3]))
    with pytest.raises(DyMUError, match="disagree on the number of blocks"):
        Thresholds.load(_write(tmp_path / "e.safetensors", bad, fmt))
    never = dict(good, thresholds=torch.tensor([float("inf"), 1.0]), count=torch.tensor([0, 0]))
    th = Thresholds.load(_write(tmp_path / "f.safetensors", never, fmt))
    assert th.merging_blocks() == [None, None]


def test_check_model_names_the_mismatch():
    th = make()
    with pytest.raises(DyMUError, match="has 4 blocks but ViT-B-16-tome has 12"):
        th.check_model("ViT-B-16-tome", "ViT-B-16", 12)
    with pytest.raises(DyMUError, match="made for ViT-B-16-tome, not for ViT-B-32-tome"):
        th.check_model("ViT-B-32-tome", "ViT-B-32", 4)


def test_schedules():
    assert make_schedule(10, 4) == [3, 3, 2, 2]
    linear = make_schedule(504, 24, "linear")
    assert linear[:4] == [42, 40, 38, 36] and sum(linear) == 504 and len(linear) == 24
    assert make_schedule(504, 24, "reverse_linear") == linear[::-1]
    assert make_schedule(0, 3, "linear") == [0, 0, 0]
    # 14 blocks, 406 tokens: r0 = 58, step = 58 / 14. The reference computes 7 * step =
    # 29.000000000000004 in floats, so block 7 gets int(28.99...) = 28, not 29, and the
    # remainder grows by one; thresholds made with its schedule need the same r.
    odd = make_schedule(406, 14, "linear")
    assert odd[6:8] == [33, 28] and odd[11] == 2 and sum(odd) == 406
    assert 7 * (58 / 14) > 29
    assert make_schedule(5, 3, [1, 0, 4]) == [1, 0, 4]
    with pytest.raises(DyMUError, match="3 non-negative entries"):
        make_schedule(5, 3, [1, 4])
    with pytest.raises(DyMUError, match="unknown schedule"):
        make_schedule(5, 3, "cubic")
