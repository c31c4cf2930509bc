"""Per-forward overhead counted on the CPU (``scripts/support/op_counter.py``, the counter of
``scripts/bench_overhead.py``): kernel-launching ATen ops and blocking host syncs (reads and
uploads), the proxy that the GPU budgets are stated in."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, cache_kwarg, cache_of

import dymu

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the scripts' own support package
overhead = importlib.import_module("support.op_counter")
inductor = importlib.import_module("support.inductor_launches")


def test_counter_on_a_hand_made_function():
    a, b = torch.randn(4), torch.randn(4)
    tolist, to, tensor = torch.Tensor.tolist, torch.Tensor.to, torch.tensor

    def fn() -> None:
        c = a + b  # op 1
        c.view(2, 2).transpose(0, 1)  # views: no op
        c.sum().item()  # op 2, read 1
        torch.nonzero(c > 0)  # ops 3 and 4, read 2
        c[c > 0]  # ops 5 and 6 (gt, index), read 3: boolean indexing
        c.clone()[c > 0] = 1.0  # ops 7 to 9 (clone, gt, index_put_): a masked fill, no read
        c.tolist()  # read 4, however long
        c.cpu().tolist()  # read 5: the copy to the host, then host data
        c.to("cpu", non_blocking=True).tolist()  # an asynchronous copy: not counted
        host = torch.tensor([1.0, 2.0])  # host data: reading it costs nothing
        host.tolist()
        host.sum().item()  # op 10
        torch.tensor([1, 2], device=a.device)  # upload 1
        up = host.to(a.device)  # upload 2
        torch.repeat_interleave(up.long(), output_size=3)  # ops 11 and 12, no read
        torch.repeat_interleave(up.long())  # ops 13 and 14, read 6
        torch.empty(3)  # an allocation: no op

    with torch.inference_mode(), overhead.OverheadCounter([a, b]) as counter:
        fn()
    count = counter.count
    assert (count.ops, count.host_reads, count.uploads) == (14, 6, 2), count
    assert sum(n for s, n in count.sites.items() if s.startswith("read ")) == 6
    assert all("test_overhead.py:" in s for s in count.sites)
    # the wrapped functions are restored
    assert (torch.Tensor.tolist, torch.Tensor.to, torch.tensor) == (tolist, to, tensor)
    assert "tolist" not in vars(torch.Tensor)


def test_counter_skips_the_first_call():
    x = torch.randn(3)
    calls = []

    def fn() -> None:
        calls.append(1)
        if len(calls) == 1:
            (x * 2).sum().item()  # set-up work of the first call is not counted
        x.sum()

    count = overhead.count_forward(fn, x)
    assert (len(calls), count.ops, count.host_reads) == (2, 1, 0)


@pytest.fixture(scope="module")
def pixels(photos):
    enc = dymu.build_encoder(f"{TINY}-tome")
    return torch.stack([enc.preprocess(p) for p in photos[:4]])


def forward_count(enc: dymu.DyMUEncoder, pixels: torch.Tensor):
    return overhead.count_forward(lambda: enc(pixels), enc, pixels)


HOST_KNOWN = ("fixed-r", "no-merge")


def host_known_encoder(how: str) -> dymu.DyMUEncoder:
    if how == "fixed-r":
        return dymu.build_encoder(f"{TINY}-tome", fixed_r=True)
    return dymu.build_encoder(f"{TINY}-tome", r_total=0)


@pytest.mark.parametrize("how", HOST_KNOWN)
def test_host_known_shapes_never_sync(pixels, how):
    """Fixed-r and no-merge know every shape on the host: no read, no upload (issue 19).
    The packing's index tensors are made on the host and copied without blocking."""
    count = forward_count(host_known_encoder(how), pixels)
    assert (count.host_reads, count.uploads) == (0, 0), count.sites


@pytest.fixture(scope="module")
def threshold_encoder(pixels):
    enc = dymu.build_encoder(f"{TINY}-tome-24out")
    enc.set_thresholds(dymu.find_thresholds(enc, [pixels[:2], pixels[2:]]))
    return enc


def merging_blocks(enc: dymu.DyMUEncoder) -> int:
    return sum(t is not None for t in enc.thresholds.merging_blocks()[: enc.num_run])


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_threshold_merging_syncs_at_most_once_per_forward(threshold_encoder, pixels, lag):
    """The new lengths of every merge go to the host without blocking and are read blocks
    later (after an event on a GPU): no read or upload inside the block loop."""
    threshold_encoder.read_lag = lag
    try:
        count = forward_count(threshold_encoder, pixels)
    finally:
        threshold_encoder.read_lag = None
    assert merging_blocks(threshold_encoder) > 0
    assert count.host_reads + count.uploads <= 1, count.sites


@pytest.mark.parametrize("lag", [0, 1])
def test_a_calibration_batch_syncs_at_most_once(threshold_encoder, pixels, lag):
    """The batch rule counts its merges and caps on the device and its lengths are read
    blocks later, as at inference: no read or upload per merging block."""
    threshold_encoder.read_lag = lag
    try:
        count = overhead.count_forward(
            lambda: threshold_encoder.calibrate(pixels), threshold_encoder, pixels
        )
    finally:
        threshold_encoder.read_lag = None
    assert merging_blocks(threshold_encoder) > 1
    assert count.host_reads + count.uploads <= 1, count.sites


def test_fused_merges_count_their_compiled_kernels_and_fit_the_budget(threshold_encoder, pixels):
    """With ``fuse=True`` every merge is one compiled step, counted as the launches in the code
    inductor makes for it: the forward is within issue 19's 3x of the tower's own ops, which
    the eager merge is not."""
    tower = threshold_encoder.tower
    vanilla = overhead.count_forward(lambda: tower.module(pixels), tower, pixels)
    eager = forward_count(threshold_encoder, pixels)
    threshold_encoder.fuse = True
    try:
        fused = forward_count(threshold_encoder, pixels)
    finally:
        threshold_encoder.fuse = None
    steps = fused.ops_by_name["fused merge step"]
    assert steps >= 3 * merging_blocks(threshold_encoder)  # at least scores, sort, a merge
    assert fused.ops <= 3 * vanilla.ops < eager.ops, (fused.ops, vanilla.ops, eager.ops)
    assert fused.host_reads + fused.uploads <= 1, fused.sites


def test_compiled_call_launches_counts_each_graph_and_leaves_the_module_eager():
    """A module compiled for one call: a graph per side of a graph break (``.item()``), at
    least one launch in each (the product and the sum are real work), and afterwards the
    module runs its own eager forward again."""

    class TwoGraphs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.linear(x).relu()
            scale = float(y.sum())  # a host read: dynamo breaks the graph here
            return (y * scale).softmax(-1)

    module, x = TwoGraphs(), torch.randn(4, 8)
    with torch.no_grad():
        want = module(x)
        launches, graphs = inductor.compiled_call_launches(module, lambda: module(x))
        assert module._compiled_call_impl is None  # eager again
        assert torch.allclose(module(x), want)
    assert graphs == 2
    assert launches >= graphs


@pytest.mark.parametrize("how", [*HOST_KNOWN, "fixed-r fused"])
def test_host_known_shapes_compile_into_one_graph(pixels, how):
    """Fixed-r and no-merge have no data-dependent shape: dynamo captures the whole forward
    (``fullgraph=True`` raises on any graph break), and it computes what eager mode does;
    a fused merge step is traced into the model's graph."""
    torch._dynamo.reset()
    enc = host_known_encoder(how.removesuffix(" fused")).eval()
    enc.fuse = how.endswith("fused")
    with torch.no_grad():
        eager = enc(pixels)
        compiled = torch.compile(enc, fullgraph=True, backend="eager")(pixels)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert torch.equal(compiled.lengths, eager.lengths)
    assert torch.equal(compiled.groups, eager.groups)


def test_a_vtu_prefill_reads_the_host_once_beyond_the_plain_model():
    """VTU's mapping work is made once per forward (the packed slot count is its one host
    read); the layers add no read and no upload, at any batch size."""
    from conftest import TINY_LM
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**TINY_LM)).eval()
    embeds = torch.randn(3, 24, TINY_LM["hidden_size"])
    mapping = torch.stack([torch.arange(24) * k // 24 for k in (20, 5, 12)])
    plain = overhead.count_forward(lambda: lm(inputs_embeds=embeds), lm, embeds)
    dymu.apply_vtu(lm)
    vtu = overhead.count_forward(
        lambda: lm(inputs_embeds=embeds, vtu_mapping=mapping), lm, embeds, mapping
    )
    assert vtu.uploads == plain.uploads == 0, vtu.sites
    assert vtu.host_reads - plain.host_reads == 1, (vtu.sites, plain.sites)


def test_vtu_adds_two_host_reads_to_a_llava_prefill(photos):
    """hf_llava's mapping work reads the device twice per prefill (the image-token count it
    checks, the packed slot count), whatever the batch; the merged token count is the host's
    copy of the encoder's lengths."""
    from test_hf_llava import build, never_merge, pixels, prompts

    from dymu.integrations import hf_llava

    x, ids = pixels(photos[:3]), prompts(3)

    def prefill_reads(vtu: bool) -> int:
        model = build()
        hf_llava.apply(model, never_merge(model), vtu=vtu)
        count = overhead.count_forward(lambda: model(input_ids=ids, pixel_values=x), model, x, ids)
        assert count.uploads == 0, count.sites
        return count.host_reads

    assert prefill_reads(True) - prefill_reads(False) == 2


def test_a_decode_step_after_a_vtu_prefill_costs_what_vanilla_costs():
    """After a VTU prefill, decoding runs the unpatched code on the full-length cache: a
    decode step dispatches the same ops and reads the host as often as the plain model's."""
    from conftest import TINY_LM
    from transformers import LlamaConfig, LlamaForCausalLM

    embeds = torch.randn(2, 24, TINY_LM["hidden_size"])
    mapping = torch.stack([torch.arange(24) * k // 24 for k in (20, 5)])

    def decode_step(vtu: bool) -> overhead.Count:
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(**TINY_LM)).eval()
        extra = {}
        if vtu:
            dymu.apply_vtu(lm)
            extra = {"vtu_mapping": mapping}
        with torch.inference_mode():
            out = lm(inputs_embeds=embeds, use_cache=True, **extra)
        cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == 24  # the prefill cached every full position
        past = {cache_kwarg(lm): cache}
        step = lambda: lm(input_ids=token, use_cache=True, **past)  # noqa: E731
        return overhead.count_forward(step, lm, token)

    plain, vtu = decode_step(False), decode_step(True)
    assert plain.ops > 0 and vtu.ops == plain.ops, (vtu.ops_by_name, plain.ops_by_name)
    assert vtu.host_reads == plain.host_reads and vtu.uploads == plain.uploads
