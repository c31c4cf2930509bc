"""The safetensors format: round trip, validation messages, merging partial results."""

import pytest
import torch
from safetensors.torch import save_file

from dymu import DyMUError, Thresholds, make_schedule
from dymu.thresholds import TowerIdentity

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


def identity(label: str, weight: torch.Tensor, arch: str = "4 blocks") -> TowerIdentity:
    return TowerIdentity.of(label, arch, weight, "openai")


def test_check_tower_names_the_mismatch():
    th = make()  # a file without a tower record: dymu names are compared
    with pytest.raises(DyMUError, match="has 4 blocks but ViT-B-16-tome has 12"):
        th.check_tower(identity("ViT-B-16-tome", torch.ones(2, 3)), 12)
    with pytest.raises(DyMUError, match="made for ViT-B-16-tome, not for ViT-B-32-tome"):
        th.check_tower(identity("ViT-B-32-tome", torch.ones(2, 3)), 4)
    th.check_tower(identity("some-folder", torch.ones(2, 3)), 4)  # not a dymu name: no record


def test_tower_record_refuses_another_tower_naming_both():
    weight = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    made = identity("siglip-folder", weight, "4 blocks, width 8")
    th = make()
    th.metadata.update(made.metadata())
    th.check_tower(made, 4)  # the same tower
    other_arch = identity("clip-folder", weight, "4 blocks, width 16")
    with pytest.raises(DyMUError, match="made for siglip-folder .*not for clip-folder"):
        th.check_tower(other_arch, 4)
    reseeded = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(DyMUError, match="made for siglip-folder .*not for clip-folder"):
        th.check_tower(identity("clip-folder", reseeded, "4 blocks, width 8"), 4)


def test_weights_fingerprint_survives_precision_and_patch_layout():
    weight = torch.randn(8, 3, 14, 14, generator=torch.Generator().manual_seed(0))
    base = identity("a", weight)
    for dtype in (torch.float16, torch.bfloat16):
        assert base.same_weights(identity("b", weight.to(dtype)))
    # SigLIP2 stores the same patch embedding as a linear layer over (p, p, C) patches
    linear = weight.permute(0, 2, 3, 1).reshape(8, -1)
    assert base.same_weights(identity("c", linear))
    for seed in range(1, 20):
        other = torch.randn(8, 3, 14, 14, generator=torch.Generator().manual_seed(seed))
        assert not base.same_weights(identity("d", other))
    # the record survives a save and load
    restored = TowerIdentity.from_metadata({**base.metadata(), "pretrained": "openai"})
    assert restored.same_weights(base) and restored.architecture == base.architecture


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
