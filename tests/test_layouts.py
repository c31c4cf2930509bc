"""Marker rows and slot mappings (dymu.lm.layouts) on small hand-worked examples."""

import pytest
import torch
import torch.nn.functional as F

from dymu import DyMUError
from dymu.lm.layouts import marker_rows, place_keys, read_markers, slot_mapping


def test_markers_name_their_merged_token_through_reshapes():
    groups = torch.tensor([[0, 0, 1, 2], [1, 0, 1, 1]])  # crop 1's tokens are keys 3 and 4
    rows = marker_rows(groups, torch.tensor([3, 2]), dim=12)
    keys = read_markers(rows.flip(1).reshape(-1, 12), num_keys=5)  # any order, any shape
    assert keys.tolist() == [2, 1, 0, 0, 4, 4, 3, 4]


def test_blends_newlines_and_padding_read_as_their_own():
    groups = torch.tensor([[0, 1, 1, -1]])
    rows = marker_rows(groups, torch.tensor([2]), dim=8)[0]
    blend = 0.75 * rows[0] + 0.25 * rows[1]  # two tokens mixed: a slot of its own
    same = 0.3 * rows[1] + 0.7 * rows[2]  # one token through a blend: still that token
    newline = torch.randn(8)
    got = read_markers(torch.stack([blend, same, newline, rows[3]]), num_keys=2)
    assert got.tolist() == [-1, 1, -1, -1]


def test_a_row_off_the_tag_in_one_channel_reads_as_its_own():
    """Every tag channel must read -1 (to 1e-4): one channel off, above or below, or a
    NaN, and the row is no marker."""
    rows = marker_rows(torch.tensor([[0, 1, 1]]), torch.tensor([2]), dim=10)[0]
    off = rows[1].repeat(5, 1)  # token 1's marker, tag channels 2-9
    off[0, 6] += 2e-4
    off[1, 9] -= 2e-4
    off[2, 7] = float("nan")
    off[3, 8] += 5e-5  # within the tolerance: still its token
    assert read_markers(off, num_keys=2).tolist() == [-1, -1, -1, 1, 1]


def test_bilinear_pooling_keeps_only_windows_inside_one_token():
    groups = torch.tensor([[0, 0, 1, 2, 0, 0, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]])  # a 4 x 4 grid
    rows = marker_rows(groups, torch.tensor([5]), dim=10)[0]
    grid = rows.view(4, 4, 10).permute(2, 0, 1)[None]
    pooled = F.interpolate(grid, size=(2, 2), mode="bilinear")[0].permute(1, 2, 0)
    # window (0,0) is all token 0; (0,1) mixes 1 and 2; the bottom windows are 3 and 4
    assert read_markers(pooled.reshape(4, 10), 5).tolist() == [0, -1, 3, 4]


def test_markers_are_exact_in_bfloat16():
    groups = torch.arange(600).view(2, 300) % 250
    rows = marker_rows(groups, torch.tensor([250, 250]), dim=16).to(torch.bfloat16)
    expected = groups + torch.tensor([[0], [250]])
    assert torch.equal(read_markers(rows, 500), expected)


def test_slot_mapping_by_hand():
    keys = torch.tensor([[-1, 7, 7, -1, 3, 7, -1], [4, -1, 4, 4, -1, -1, 9]])
    assert slot_mapping(keys).tolist() == [[0, 1, 1, 2, 3, 1, 4], [0, 1, 0, 0, 2, 3, 4]]
    assert slot_mapping(torch.full((2, 5), -1)).tolist() == [list(range(5))] * 2


def test_nothing_merged_is_the_identity():
    groups = torch.arange(6).repeat(3, 1)
    keys = read_markers(marker_rows(groups, torch.tensor([6, 6, 6]), dim=12).view(-1, 12), 18)
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[0, 2:11], mask[1, 1:10] = True, True
    mapping = slot_mapping(place_keys(mask, keys))
    assert torch.equal(mapping, torch.arange(14).expand(2, 14))


def test_clear_errors():
    with pytest.raises(DyMUError, match="too narrow to trace 70 merged tokens"):
        marker_rows(torch.arange(70)[None], torch.tensor([70]), dim=6)
    with pytest.raises(DyMUError, match="hold 3 image tokens but the images give 4 features"):
        place_keys(torch.tensor([[True, True, True]]), torch.arange(4))
