"""Packing's pad and pack against a loop over images written here."""

import pytest
import torch

from dymu.engine.packing import Packing


@pytest.mark.parametrize("trailing", [(), (4,), (3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("lengths", [[3, 7, 1, 5], [3, 7, 1, 5] * 10])  # 40: by indexing
def test_pad_and_pack_equal_a_loop_over_images(trailing, dtype, lengths):
    packing = Packing.from_lengths(lengths, torch.device("cpu"))
    packed = (torch.arange(sum(lengths) * max(1, torch.Size(trailing).numel())) + 1).to(dtype)
    packed = packed.view(sum(lengths), *trailing)
    fill = -5 if dtype == torch.int64 else float("-inf")
    padded = packing.pad(packed, fill)
    assert padded.shape == (len(lengths), 7, *trailing) and padded.dtype == dtype
    start = 0
    for b, n in enumerate(lengths):
        assert torch.equal(padded[b, :n], packed[start : start + n])
        assert (padded[b, n:] == fill).all()
        start += n
    assert torch.equal(packing.pack(padded), packed)
    # a strided padded view (a slice of a wider tensor) packs the same
    wider = torch.cat([padded, padded], -1) if trailing else torch.stack([padded, padded], -1)
    view = wider[..., : padded.shape[-1]] if trailing else wider[..., 0]
    assert not view.is_contiguous() and torch.equal(packing.pack(view), packed)


def test_a_batch_of_one_length_packs_by_reshaping():
    packing = Packing.from_lengths([4, 4], torch.device("cpu"))
    packed = torch.randn(8, 3)
    assert packing.index is None
    assert packing.pad(packed).data_ptr() == packed.data_ptr()
    assert torch.equal(packing.pack(packing.pad(packed)), packed)


def test_the_index_path_for_gradients_gives_the_same_tensors():
    # the jagged kernels have no backward: tensors that need gradients take the index path
    lengths = [2, 5, 3]
    packing = Packing.from_lengths(lengths, torch.device("cpu"))
    packed = torch.randn(10, 4)
    fast = packing.pad(packed, 0.0)
    slow = packing.pad(packed.clone().requires_grad_(), 0.0)
    assert slow.requires_grad and torch.equal(fast, slow.detach())
    packing.pack(slow).sum().backward()  # gradients flow back through pad and pack
