"""The ways packed images of different lengths attend (dymu/attention.py) against attention
written out image by image, and inside the encoder against each other."""

import numpy as np
import pytest
import torch
from conftest import TINY
from naive import naive_encode

import dymu
from dymu import attention
from dymu.engine.attention import ATTENTION_MODES, attend
from dymu.engine.packing import Packing

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
MODES = [m for m in ATTENTION_MODES if m != "auto"]


def by_hand(q, k, v, heads, lengths, sizes):
    """softmax(q k^T / sqrt(d) + log(size_k)) v, one image and one head at a time."""
    d = q.shape[-1] // heads
    out = torch.empty_like(q)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[rows, cols] @ k[rows, cols].T / d**0.5
            if sizes is not None:
                scores = scores + sizes[rows].log()[None, :]
            out[rows, cols] = scores.softmax(-1) @ v[rows, cols]
        start += n
    return out


def logs(sizes):
    """What ``attend`` takes: the log of every key's size."""
    return None if sizes is None else sizes.log()


def packed(lengths, dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, dim, generator=gen).to(dtype) for _ in range(3))
    sizes = torch.randint(1, 9, (total,), generator=gen).float()
    return q, k, v, sizes, Packing.from_lengths(list(lengths), torch.device("cpu"))


@pytest.fixture
def ways(monkeypatch):
    """Every call of the batched SDPA (``("sdpa", images in the call)``), the nested and the
    flex way, recorded: which way really ran, not only that the result is right."""
    calls = []

    def spy(name, func):
        def recorded(*args):
            calls.append(("sdpa", args[5]) if name == "sdpa" else (name, None))
            return func(*args)

        monkeypatch.setattr(attention, f"_{name}", recorded)

    for name in ("sdpa", "padded", "nested", "flex"):
        spy(name, getattr(attention, f"_{name}"))
    return calls


def expected_calls(mode: str, lengths) -> list:
    """The way each mode must take: equal lengths share one batched call (except flex),
    unequal lengths run the mode itself (the loop: one call per image)."""
    if mode == "flex":
        return [("flex", None)]
    if len(set(lengths)) == 1:
        return [("sdpa", len(lengths))]
    if mode != "loop":
        return [(mode, None)]
    kinds = sorted(set(lengths))
    if 2 * len(kinds) <= len(lengths):  # one batched call per length, shortest first
        return [("sdpa", lengths.count(n)) for n in kinds]
    return [("sdpa", 1)] * len(lengths)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_sizes", [True, False])
@pytest.mark.parametrize(
    "lengths", [(7, 20, 3, 12), (1, 65, 2), (5, 5, 5), (130, 17), (7, 3, 7, 3, 12, 7)]
)
def test_every_way_equals_attention_by_hand(mode, with_sizes, lengths, ways):
    q, k, v, sizes, packing = packed(lengths)
    sizes = sizes if with_sizes else None
    out = attend(q, k, v, 4, packing, logs(sizes), mode)
    assert ways == expected_calls(mode, lengths)
    assert torch.allclose(out, by_hand(q, k, v, 4, lengths, sizes), atol=1e-5)


@pytest.mark.parametrize("mode", ["padded", "nested", "flex"])
def test_bf16_packed_ways_agree_with_the_loop(mode, ways):
    lengths = (9, 40, 2, 23)
    q, k, v, sizes, packing = packed(lengths, dim=64, dtype=torch.bfloat16, seed=1)
    loop = attend(q, k, v, 4, packing, logs(sizes), "loop").float()
    ways.clear()
    out = attend(q, k, v, 4, packing, logs(sizes), mode).float()
    assert ways == expected_calls(mode, lengths)
    exact = by_hand(q.float(), k.float(), v.float(), 4, lengths, sizes)
    assert attend(q, k, v, 4, packing, logs(sizes), mode).dtype == q.dtype
    # as close to the fp32 result as the loop is (bf16 keeps 8 bits)
    assert (out - exact).abs().max() <= 2 * (loop - exact).abs().max() + 1e-2
    assert (out - loop).abs().max() < 3e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", [(7, 12, 5), (7, 12, 7, 12)])
def test_dead_rows_are_masked_every_way(mode, lengths):
    # rows of size 0 (merged away, removal deferred: log size -inf) are no keys at all:
    # the result on the live rows equals attention over the live rows alone
    q, k, v, sizes, packing = packed(lengths, seed=2)
    dead = torch.zeros(sum(lengths), dtype=torch.bool)
    dead[[5, 6, 15, 16, 17, 18]] = True  # the last rows of images 0 and 1
    sizes = sizes.masked_fill(dead, 0.0)
    out = attend(q, k, v, 4, packing, logs(sizes), mode)
    live = (5, 8, *lengths[2:])
    expect = by_hand(q[~dead], k[~dead], v[~dead], 4, live, sizes[~dead])
    assert torch.isfinite(out).all()
    assert torch.allclose(out[~dead], expect, atol=1e-5)


def test_the_loop_groups_images_by_length_in_a_hand_worked_order():
    """Lengths (2, 1, 2): the image of length 1 (row 2) first, then images 0 and 2 in order
    (rows 0, 1 and 3, 4)."""
    assert attention._by_length(np.array([2, 1, 2])).tolist() == [2, 0, 1, 3, 4]
    assert attention._by_length(np.array([3, 3])).tolist() == [0, 1, 2, 3, 4, 5]


def test_auto_takes_the_loop_on_a_cpu_and_the_padded_call_on_a_gpu(ways):
    q, k, v, sizes, packing = packed((4, 9))
    attend(q, k, v, 4, packing, logs(sizes), "auto")
    assert ways == [("sdpa", 1), ("sdpa", 1)]
    assert attention.auto_way("cuda") == "padded" and attention.auto_way("cpu") == "loop"


def test_unknown_mode_is_refused():
    expected = "attention must be one of auto, loop, padded, nested, flex"
    with pytest.raises(dymu.DyMUError, match=expected):
        dymu.build_encoder(f"{TINY}-tome-24out", attention="fast")


@pytest.fixture(scope="module")
def calibrated(photos):
    encoder = dymu.build_encoder(f"{TINY}-tome-24out")
    pixels = torch.stack([encoder.preprocess(p) for p in photos])
    encoder.set_thresholds(dymu.find_thresholds(encoder, [pixels[:6], pixels[6:]]))
    return encoder, pixels


@pytest.mark.parametrize("mode", MODES)
def test_encoder_gives_the_same_result_every_way(calibrated, mode, ways):
    encoder, pixels = calibrated
    with torch.inference_mode():
        encoder.attention = "loop"
        loop = encoder(pixels)
        ways.clear()
        encoder.attention = mode
        out = encoder(pixels)
    encoder.attention = "auto"
    # after the first merge the images' lengths differ: the mode's own way must have run
    own = ("sdpa", 1) if mode == "loop" else (mode, None)
    assert own in ways
    assert len(set(out.lengths.tolist())) > 2  # the photos really have different lengths
    assert torch.equal(out.lengths, loop.lengths) and torch.equal(out.groups, loop.groups)
    assert torch.allclose(out.tokens, loop.tokens, atol=1e-5)
    assert torch.allclose(out.pooled, loop.pooled, atol=1e-5)
    taus = encoder.thresholds.thresholds.tolist()
    with torch.no_grad():
        xs, *_ = naive_encode(encoder.tower.visual, pixels, encoder.r, taus)
    assert all(torch.allclose(t, x, atol=1e-4) for t, x in zip(out.to_list(), xs, strict=True))
