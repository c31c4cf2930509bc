"""The matcher and merge on small hand-built tensors, worked out by hand."""

import math

import torch

from dymu.engine.merge import Packing, batch_rule, bipartite_scores, plan_merge, threshold_rule

INF = math.inf


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_scores_cls_padding_and_best_partner():
    # positions 0..5: A = 0,2,4 ; B = 1,3,5. Position 0 is the class token.
    metric = torch.tensor([[unit(0), unit(0), unit(90), unit(80), unit(10), unit(180)]]) * 3.0
    node_max, node_idx = bipartite_scores(metric, torch.tensor([6]), num_prefix=1)
    assert node_max[0, 0] == -INF  # class token never a source, even with an identical B
    # A1 (90 deg) is closest to B1 (80 deg): cos 10 deg; A2 (10 deg) to B0 (0 deg): cos 10 deg
    assert node_idx[0].tolist()[1:] == [1, 0]
    assert torch.allclose(node_max[0, 1:], torch.tensor([math.cos(math.radians(10))] * 2))
    # with length 5, B2 (position 5) is padding and A2 can no longer use it; A with length 3
    node_max, node_idx = bipartite_scores(metric, torch.tensor([3]), num_prefix=1)
    assert node_max[0].tolist()[2] == -INF  # position 4 is padding
    assert node_idx[0, 1] == 0  # only B0 (position 1) is real: cos 90 deg = 0
    assert abs(node_max[0, 1].item()) < 1e-6


def test_threshold_rule_is_strict():
    node_max = torch.tensor([[-INF, 0.5, 0.7, 0.2]])
    merged = threshold_rule(node_max, 0.5)
    assert merged.tolist() == [[False, False, True, False]]


def test_scores_are_compared_in_float32_whatever_the_towers_precision():
    # cls, B0, A1, B1: A1 (0 deg) meets B1 (25.84 deg), cos = 0.90001 in exact arithmetic
    metric = torch.tensor([[unit(90), unit(180), unit(0), unit(25.84)]], dtype=torch.float16)
    a, b = metric[0, 2].double(), metric[0, 3].double()
    exact = float(a @ b / (a.norm() * b.norm()))
    assert 0.9 < exact < 0.90005  # above 0.9, but fp16 would round it to 0.89990234375
    node_max, _ = bipartite_scores(metric, torch.tensor([4]), num_prefix=1)
    assert node_max.dtype == torch.float32 and abs(node_max[0, 1].item() - exact) < 1e-6
    # an fp16 score would tie with an fp16 threshold of 0.9 (ties never merge); in fp32 the
    # pair is above 0.9 and merges, as exact arithmetic says
    assert float(torch.tensor(exact).half()) == float(torch.tensor(0.9).half())
    assert threshold_rule(node_max, 0.9)[0, 1]


def test_threshold_rule_has_no_cap_without_prefix_tokens():
    # 5 tokens, no prefix token: DESIGN 3 has no cap, so all three A tokens may merge into
    # the two B tokens (the reference's batch path), leaving 2 tokens
    node_max = torch.tensor([[0.9, 0.95, 0.91]])
    assert threshold_rule(node_max, 0.1).tolist() == [[True, True, True]]
    plan = plan_merge(
        threshold_rule(node_max, 0.1), torch.tensor([[0, 1, 1]]), torch.tensor([5]), 5
    )
    assert plan.host_lengths == (2,)


def test_batch_rule_ranks_across_the_batch_with_stable_ties():
    node_max = torch.tensor([[-INF, 0.9, 0.3], [-INF, 0.9, 0.8]])
    merged, thr = batch_rule(node_max, 2)
    # top 2 over the flattened batch: the two 0.9 edges; the best unmerged one is 0.8
    assert merged.tolist() == [[False, True, False], [False, True, False]]
    assert thr.item() == torch.tensor(0.8).item()
    merged, thr = batch_rule(node_max, 1)  # tie: the lower flat index (image 0) wins
    assert merged.tolist() == [[False, True, False], [False, False, False]]
    assert abs(thr.item() - 0.9) < 1e-7


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
    lengths = torch.tensor([7])
    merged = torch.tensor([[False, True, False, True]])
    node_idx = torch.tensor([[0, 2, 0, 2]])
    plan = plan_merge(merged, node_idx, lengths, 7)
    assert plan.length == 5 and plan.lengths.tolist() == [5] and plan.host_lengths == (5,)
    before, after = Packing.from_lengths([7], x.device), Packing.from_lengths([5], x.device)
    out, sizes = plan.merge(x[0], None, before, after)
    # order: unmerged A (pos 0, 4), then B (pos 1, 3, 5); B2 holds mean(5, 2, 6)
    assert torch.allclose(out[:, 0], torch.tensor([0.0, 4.0, 1.0, 3.0, (5 + 2 + 6) / 3]))
    assert sizes.tolist() == [1, 1, 1, 1, 3]
    groups = plan.track(torch.arange(7)[None])
    assert groups[0].tolist() == [0, 2, 4, 3, 1, 4, 4]
    # a second merge weights by size: A2 (slot 4, value 13/3, size 3) into B0 (slot 1,
    # value 4) gives (13 + 4) / 4; new order: A0 (slot 0), A1 (slot 2), B0, B1 (slot 3)
    merged = torch.tensor([[False, False, True]])
    plan2 = plan_merge(merged, torch.tensor([[0, 0, 0]]), plan.lengths, 5)
    out2, sizes2 = plan2.merge(out, sizes, after, Packing.from_lengths([4], x.device))
    assert torch.allclose(out2[:, 0], torch.tensor([0.0, 1.0, (13 + 4) / 4, 3.0]))
    assert sizes2.tolist() == [1, 1, 4, 1]
    assert torch.bincount(plan2.track(groups)[0]).tolist() == sizes2.int().tolist()


def test_merge_pads_and_keeps_unmerged_images_in_order():
    x = torch.randn(2, 5, 3)
    lengths = torch.tensor([5, 5])
    merged = torch.tensor([[False, True, False], [False, False, False]])
    plan = plan_merge(merged, torch.tensor([[0, 0, 0], [0, 0, 0]]), lengths, 5)
    assert plan.lengths.tolist() == [4, 5] and plan.length == 5
    before, after = Packing.from_lengths([5, 5], x.device), Packing.from_lengths([4, 5], x.device)
    out, sizes = plan.merge(x.reshape(10, 3), None, before, after)
    assert torch.equal(out[4:], x[1])  # no merge: order and values unchanged
    assert after.pad(sizes)[0].tolist() == [1, 1, 2, 1, 0]  # padded view: size 0
    assert torch.allclose(out[2], (x[0, 1] + x[0, 2]) / 2)
    # calibration reorders every image, merged or not: [A0, A1, A2, B0, B1]
    plan = plan_merge(merged, torch.zeros(2, 3, dtype=torch.long), lengths, 5, reorder_all=True)
    out, _ = plan.merge(x.reshape(10, 3), None, before, after)
    assert torch.equal(out[4:], x[1, [0, 2, 4, 1, 3]])


def test_nothing_merged_is_no_plan():
    merged = torch.zeros(1, 3, dtype=torch.bool)
    assert plan_merge(merged, torch.zeros(1, 3, dtype=torch.long), torch.tensor([5]), 5) is None


def test_prefix_tokens_are_never_sources_destinations_or_moved():
    # 11 tokens, 5 prefix (a class token and 4 registers): positions 0-4. A = 0,2,4,6,8,10 ;
    # B = 1,3,5,7,9. Every token has the same key, so without the prefix rule everything
    # would match everything at cosine 1.
    metric = torch.ones(1, 11, 2)
    lengths = torch.tensor([11])
    node_max, node_idx = bipartite_scores(metric, lengths, num_prefix=5)
    assert node_max[0, :3].tolist() == [-INF] * 3  # prefix A tokens (0, 2, 4): never sources
    assert torch.allclose(node_max[0, 3:], torch.ones(3))
    assert node_idx[0, 3:].tolist() == [2, 2, 2]  # the first non-prefix B token (position 5)
    # the calibration cap counts mergeable tokens only: (11 - 5) // 2 = 3 per image
    merged, _ = batch_rule(node_max, 1 * min(100, (11 - 5) // 2))
    assert merged[0].tolist() == [False, False, False, True, True, True]
    plan = plan_merge(merged, node_idx, lengths, 11, num_prefix=5)
    assert plan.host_lengths == (8,)
    # prefix slots 0-4 unchanged; no A token kept; B positions 5, 7, 9 -> slots 5, 6, 7;
    # A positions 6, 8, 10 join position 5's slot
    groups = plan.track(torch.arange(11)[None])
    assert groups[0].tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 5, 7, 5]
    x = torch.arange(11, dtype=torch.float32)[:, None]
    before, after = Packing.from_lengths([11], x.device), Packing.from_lengths([8], x.device)
    out, sizes = plan.merge(x, None, before, after)
    assert out[:, 0].tolist() == [0, 1, 2, 3, 4, (5 + 6 + 8 + 10) / 4, 7, 9]
    assert sizes.tolist() == [1, 1, 1, 1, 1, 4, 1, 1]


def test_padded_input_patches_keep_group_minus_one():
    # an image with 4 real tokens in a row of 6 (a padded SigLIP2 batch): -1 stays -1
    merged = torch.tensor([[False, True, False]])
    plan = plan_merge(merged, torch.tensor([[0, 0, 0]]), torch.tensor([4]), 6, reorder_all=True)
    groups = plan.track(torch.tensor([[0, 1, 2, 3, -1, -1]]))
    assert groups[0].tolist() == [0, 1, 1, 2, -1, -1]
