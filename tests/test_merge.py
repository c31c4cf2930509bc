"""The matcher and merge on small hand-built tensors, worked out by hand."""

import math

import torch

from dymu.engine.merge import (
    Sides,
    add_merged,
    batch_merges,
    batch_rule,
    destinations,
    lay_out,
    match,
    merge_fixed_r,
    order_keys,
    split_sizes,
    threshold_rule,
    track,
    with_sizes,
)

INF = math.inf


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def live_bias(lengths, width):
    """0 on an image's first ``lengths[b]`` slots, -inf after (padding, dead rows)."""
    pos = torch.arange(width)[None, :]
    return torch.where(pos < torch.tensor(lengths)[:, None], 0.0, -INF)


def merge(x, sizes, merged, node_idx, prefix=0, reorder_all=False, bias=None):
    """The engine's threshold merge of padded ``x (B, W, D)``: new x, sizes, destinations."""
    sides = Sides(x.shape[1], prefix)
    order = order_keys(merged, bias, sides, reorder_all).sort(dim=1, stable=True)[1]
    out = lay_out(add_merged(with_sizes(x, sizes), merged, node_idx, sides), order)
    new_x, new_sizes = split_sizes(out, x.dtype)
    return new_x, new_sizes, destinations(order, x.shape[1], merged, node_idx, sides)


def test_scores_cls_padding_and_best_partner():
    # positions 0..5, position 0 the class token: A = 2, 4 ; B = 1, 3, 5
    metric = torch.tensor([[unit(0), unit(0), unit(90), unit(80), unit(10), unit(180)]]) * 3.0
    sides = Sides(6, 1)
    assert (sides.num_a, sides.num_b) == (2, 3)
    node_max, node_idx = match(metric, None, sides)
    # A at 2 (90 deg) is closest to B at 3 (80 deg): cos 10 deg; A at 4 (10 deg) to B at 1
    # (0 deg): cos 10 deg. The class token (0 deg, like B at 1) is no source at all.
    assert node_idx[0].tolist() == [1, 0]
    assert torch.allclose(node_max[0], torch.tensor([math.cos(math.radians(10))] * 2))
    # with 3 live slots, positions 3-5 are padding: A at 4 is no source, and A at 2 can only
    # use B at 1 (cos 90 deg = 0)
    node_max, node_idx = match(metric, live_bias([3], 6), sides)
    assert node_max[0, 1] == -INF
    assert node_idx[0, 0] == 0 and abs(node_max[0, 0].item()) < 1e-6


def test_threshold_rule_is_strict():
    node_max = torch.tensor([[-INF, 0.5, 0.7, 0.2]])
    merged = threshold_rule(node_max, 0.5)
    assert merged.tolist() == [[False, False, True, False]]


def test_scores_are_compared_in_float32_whatever_the_towers_precision():
    # cls, B at 1, A at 2, B at 3: A (0 deg) meets B at 3 (25.84 deg), cos = 0.90001 exactly
    metric = torch.tensor([[unit(90), unit(180), unit(0), unit(25.84)]], dtype=torch.float16)
    a, b = metric[0, 2].double(), metric[0, 3].double()
    exact = float(a @ b / (a.norm() * b.norm()))
    assert 0.9 < exact < 0.90005  # above 0.9, but fp16 would round it to 0.89990234375
    node_max, _ = match(metric.float(), None, Sides(4, 1))
    assert node_max.dtype == torch.float32 and abs(node_max[0, 0].item() - exact) < 1e-6
    # an fp16 score would tie with an fp16 threshold of 0.9 (ties never merge); in fp32 the
    # pair is above 0.9 and merges, as exact arithmetic says
    assert float(torch.tensor(exact).half()) == float(torch.tensor(0.9).half())
    assert threshold_rule(node_max, 0.9)[0, 0]


def test_threshold_rule_has_no_cap_without_prefix_tokens():
    # 5 tokens, no prefix token: DESIGN 3 has no cap, so all three A tokens may merge into
    # the two B tokens (the reference's batch path), leaving 2 tokens
    node_max = torch.tensor([[0.9, 0.95, 0.91]])
    merged = threshold_rule(node_max, 0.1)
    assert merged.tolist() == [[True, True, True]]
    x = torch.arange(5.0)[None, :, None]
    _, sizes, _ = merge(x, None, merged, torch.tensor([[0, 1, 1]]), reorder_all=True)
    assert sizes[0].tolist() == [2, 3, 0, 0, 0]  # B at 1 took A at 0; B at 3 took 2 and 4


def test_batch_rule_ranks_across_the_batch_with_stable_ties():
    node_max = torch.tensor([[-INF, 0.9, 0.3], [-INF, 0.9, 0.8]])
    merged, thr = batch_rule(node_max, 2)
    # top 2 over the flattened batch: the two 0.9 edges; the best unmerged one is 0.8
    assert merged.tolist() == [[False, True, False], [False, True, False]]
    assert thr.item() == torch.tensor(0.8).item()
    merged, thr = batch_rule(node_max, 1)  # tie: the lower flat index (image 0) wins
    assert merged.tolist() == [[False, True, False], [False, False, False]]
    assert abs(thr.item() - 0.9) < 1e-7


def test_batch_rule_takes_a_count_on_the_device():
    """The count as a 0-dim tensor (what calibration passes, so the host reads nothing):
    the same edges and threshold as the host integer."""
    node_max = torch.tensor([[-INF, 0.9, 0.3], [-INF, 0.9, 0.8]])
    for count in (0, 1, 2, 3, 6):
        want = batch_rule(node_max, count)
        got = batch_rule(node_max, torch.tensor(count))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), count


def test_batch_merges_caps_at_half_the_longest_images_mergeable_tokens():
    lengths = torch.tensor([5, 9, 7])  # the longest: 9 tokens, 1 of them a class token
    # (9 - 1) // 2 per image; A slots at width 9: positions 2, 4, 6, 8 (the class token at 0)
    assert [t.item() for t in batch_merges(lengths, 10, 1)] == [3 * 4, 3 * 4 - 1]
    assert batch_merges(lengths, 3, 1)[0].item() == 3 * 3  # r itself where it fits
    # no prefix: 9 // 2 per image; A slots at 0, 2, 4, 6, 8
    assert [t.item() for t in batch_merges(lengths, 10, 0)] == [3 * 4, 3 * 5 - 1]


def test_batch_rule_reads_the_threshold_at_most_at_rank_last():
    """Dead rows widen a deferred merge's view: its extra -inf edges must not move the
    threshold past the live view's last edge."""
    live = torch.tensor([[0.5, 0.4], [0.3, 0.2]])  # every edge merges: rank 3 is the last
    node_max = torch.cat([live, torch.full((2, 2), -INF)], 1)  # two dead A rows per image
    merged, thr = batch_rule(node_max, torch.tensor(4), torch.tensor(3))
    assert merged.sum().item() == 4 and abs(thr.item() - 0.2) < 1e-7
    assert torch.equal(thr, batch_rule(live, 4)[1])  # what the live view gives
    assert batch_rule(node_max, 4)[1].item() == 0.0  # rank 4 of the wide view is -inf


def test_batch_rule_threshold_is_clamped_and_never_merges_padding():
    node_max = torch.tensor([[-INF, -0.4, -INF]])
    merged, thr = batch_rule(node_max, 1)
    assert merged.tolist() == [[False, True, False]]
    assert thr.item() == 0.0  # the rank-1 edge is -inf: clamped to 0
    merged, thr = batch_rule(node_max, 3)
    assert merged.tolist() == [[False, True, False]]


def test_merge_order_sizes_and_groups():
    # 7 tokens: A = 0,2,4,6 ; B = 1,3,5. A1 (pos 2) -> B2 (pos 5), A3 (pos 6) -> B2 as well.
    x = torch.arange(7, dtype=torch.float32)[None, :, None].repeat(1, 1, 2)
    merged = torch.tensor([[False, True, False, True]])
    out, sizes, dest = merge(x, None, merged, torch.tensor([[0, 2, 0, 2]]))
    # order: unmerged A (pos 0, 4), then B (pos 1, 3, 5); B2 holds mean(5, 2, 6); then two
    # dead rows (size 0) where the merged tokens were, until the lengths are read
    assert torch.allclose(out[0, :5, 0], torch.tensor([0.0, 4.0, 1.0, 3.0, (5 + 2 + 6) / 3]))
    assert sizes[0].tolist() == [1, 1, 1, 1, 3, 0, 0]
    groups = track(torch.arange(7)[None], dest)
    assert groups[0].tolist() == [0, 2, 4, 3, 1, 4, 4]
    # a second merge weights by size: A2 (slot 4, value 13/3, size 3) into B0 (slot 1,
    # value 4) gives (13 + 4) / 4; new order: A0 (slot 0), A1 (slot 2), B0, B1 (slot 3).
    # The dead rows stay dead (the bias of size 0 masks them)
    bias = sizes.log().clamp(max=0.0)
    merged = torch.tensor([[False, False, True, False]])
    out2, sizes2, dest2 = merge(out, sizes, merged, torch.zeros(1, 4, dtype=torch.long), bias=bias)
    assert torch.allclose(out2[0, :4, 0], torch.tensor([0.0, 1.0, (13 + 4) / 4, 3.0]))
    assert sizes2[0].tolist() == [1, 1, 4, 1, 0, 0, 0]
    groups2 = track(groups, dest2)
    assert torch.bincount(groups2[0], minlength=7).tolist() == sizes2[0].int().tolist()


def test_merge_keeps_unmerged_images_in_order():
    x = torch.randn(2, 5, 3)
    merged = torch.tensor([[False, True, False], [False, False, False]])
    out, sizes, _ = merge(x, None, merged, torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(out[1], x[1])  # no merge: order and values unchanged
    assert sizes[0].tolist() == [1, 1, 2, 1, 0]  # A0, A2, B0 (+A1), B1, a dead row
    assert torch.allclose(out[0, 2], (x[0, 1] + x[0, 2]) / 2)
    # calibration reorders every image, merged or not: [A0, A1, A2, B0, B1]
    out, _, _ = merge(x, None, merged, torch.zeros(2, 3, dtype=torch.long), reorder_all=True)
    assert torch.equal(out[1], x[1, [0, 2, 4, 1, 3]])


def test_half_precision_tokens_merge_in_float32():
    x = torch.tensor([[[1000.0], [1000.5], [0.25]]], dtype=torch.float16)
    merged = torch.tensor([[True, False]])  # A at 0 into B at 1
    out, sizes, _ = merge(x, None, merged, torch.zeros(1, 2, dtype=torch.long))
    assert out.dtype == torch.float16 and sizes.dtype == torch.float32
    # A at 2 kept first, then B holding the float32 mean, rounded once
    expect = ((x[0, 0].float() + x[0, 1].float()) / 2).half()
    assert out[0, 0, 0] == x[0, 2, 0] and out[0, 1, 0] == expect


def test_prefix_tokens_are_never_sources_destinations_or_moved():
    # 11 tokens, 5 prefix (a class token and 4 registers): positions 0-4; A = 6, 8, 10 ;
    # B = 5, 7, 9. Every token has the same key, so without the prefix rule everything
    # would match everything at cosine 1.
    metric = torch.ones(1, 11, 2)
    sides = Sides(11, 5)
    node_max, node_idx = match(metric, None, sides)
    assert torch.allclose(node_max, torch.ones(1, 3))
    assert node_idx[0].tolist() == [0, 0, 0]  # the first non-prefix B token (position 5)
    # the calibration cap counts mergeable tokens only: (11 - 5) // 2 = 3 per image
    merged, _ = batch_rule(node_max, 1 * min(100, (11 - 5) // 2))
    assert merged[0].tolist() == [True, True, True]
    x = torch.arange(11, dtype=torch.float32)[None, :, None]
    out, sizes, dest = merge(x, None, merged, node_idx, prefix=5)
    # prefix slots 0-4 unchanged; no A token kept; B positions 5, 7, 9 -> slots 5, 6, 7;
    # A positions 6, 8, 10 join position 5's slot
    assert track(torch.arange(11)[None], dest)[0].tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 5, 7, 5]
    assert out[0, :8, 0].tolist() == [0, 1, 2, 3, 4, (5 + 6 + 8 + 10) / 4, 7, 9]
    assert sizes[0].tolist() == [1, 1, 1, 1, 1, 4, 1, 1, 0, 0, 0]


def test_fixed_r_takes_tomes_order():
    # 7 tokens, no prefix: A = 0,2,4,6 with scores 0.5, 0.9, 0.7, 0.1 ; B = 1,3,5. r = 2:
    # A at 2 and 4 merge (into B at 5 and 1); kept A in score order (4 gone: A at 0, then 6)
    x = torch.arange(7, dtype=torch.float32)[None, :, None]
    node_max = torch.tensor([[0.5, 0.9, 0.7, 0.1]])
    node_idx = torch.tensor([[0, 2, 0, 1]])
    out, order, (sources, partners) = merge_fixed_r(
        with_sizes(x, None), node_max, node_idx, 2, Sides(7, 0)
    )
    new_x, sizes = split_sizes(out, x.dtype)
    assert order[0].tolist() == [0, 6, 1, 3, 5]
    assert sources[0].tolist() == [1, 2] and partners[0].tolist() == [2, 0]
    assert new_x[0, :, 0].tolist() == [0, 6, (1 + 4) / 2, 3, (5 + 2) / 2]
    assert sizes[0].tolist() == [1, 1, 2, 1, 2]
    # with a class token the kept A tokens keep their positions' order (ToMe sorts them)
    x = torch.arange(8, dtype=torch.float32)[None, :, None]  # A = 2, 4, 6 ; B = 1, 3, 5, 7
    node_max = torch.tensor([[0.2, 0.3, 0.9]])
    out, order, _ = merge_fixed_r(with_sizes(x, None), node_max, node_idx[:, :3], 1, Sides(8, 1))
    assert order[0].tolist() == [0, 2, 4, 1, 3, 5, 7]


def test_laying_out_into_a_packing_takes_each_images_first_new_slots():
    # two images of 5 and 3 live slots in a padded view of 5; each keeps its first 4 / 2
    # new slots, packed: what the padded layout would give, then packed
    from dymu.engine.packing import Packing

    xs = torch.arange(10.0).view(2, 5, 1)
    order = torch.tensor([[4, 0, 1, 3, 2], [2, 0, 1, 3, 4]])
    packed = lay_out(xs, order, Packing.from_lengths([4, 2], xs.device))
    assert packed[:, 0].tolist() == [4, 0, 1, 3, 7, 5]
    padded = lay_out(xs, order)
    assert torch.equal(padded[0, :4], packed[:4]) and torch.equal(padded[1, :2], packed[4:])


def test_padded_input_patches_keep_group_minus_one():
    # an image with 4 real tokens in a row of 6 (a padded SigLIP2 batch): -1 stays -1
    merged = torch.tensor([[False, True, False]])
    x = torch.randn(1, 6, 2)
    _, _, dest = merge(x, None, merged, torch.zeros(1, 3, dtype=torch.long), reorder_all=True,
                       bias=live_bias([4], 6))  # fmt: skip
    groups = track(torch.tensor([[0, 1, 2, 3, -1, -1]]), dest, gaps=True)
    assert groups[0].tolist() == [0, 1, 1, 2, -1, -1]
