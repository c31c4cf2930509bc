"""The check ``bench_vlm.py`` runs before it times anything: dymu+VTU with nothing merged must
generate what the unmodified model generates, or the benchmark stops instead of timing a
broken path."""

from __future__ import annotations

import torch

# never-merge dymu+VTU vs vanilla: the largest |logit difference| allowed at a generate step,
# relative to the step's largest |logit| (at least 1). VTU with an identity mapping is the
# model itself, bit for bit in fp32 (0 seen on CPU and an H200); in half precision
# kernels that round differently leave 8 eps (0.1 seen at llava-1.5-7b's shapes in bf16)
LOGIT_RTOL = {torch.float32: 1e-5, torch.float16: 8 * 2**-10, torch.bfloat16: 8 * 2**-7}


def check_same_generation(want, got, dtype: torch.dtype, what: str) -> None:
    """``got`` (a ``generate`` output with logits) gives ``want``'s tokens and logits at every
    step (see ``LOGIT_RTOL``); in half precision it may part from ``want`` at a near tie of
    ``want``'s, after which the sequences are no longer comparable. Else the benchmark stops."""

    def fail(why: str):
        raise SystemExit(f"check failed: {what} {why}; not timing a broken path")

    steps = len(want.logits)
    prompt, new = want.sequences[:, :-steps], want.sequences[:, -steps:]
    if got.sequences.shape != want.sequences.shape or len(got.logits) != steps:
        fail(f"generated {tuple(got.sequences.shape)}, vanilla {tuple(want.sequences.shape)}")
    if not torch.equal(got.sequences[:, :-steps], prompt):
        fail("changed the prompt")
    worst, parted = 0.0, 0
    for b in range(new.shape[0]):
        differ = (got.sequences[b, -steps:] != new[b]).nonzero()
        last = int(differ[0]) if len(differ) else steps - 1  # same history up to here
        for step in range(last + 1):
            w, g = want.logits[step][b].float(), got.logits[step][b].float()
            tol = LOGIT_RTOL[dtype] * max(1.0, w.abs().max().item())
            diff = (g - w).abs().max().item()
            worst = max(worst, diff / tol)
            if not diff <= tol:
                fail(f"logits differ from vanilla's by {diff:.3g} (> {tol:.3g}) at step {step}")
        if len(differ):
            top = want.logits[last][b].float().topk(2).values.tolist()
            tol = LOGIT_RTOL[dtype] * max(1.0, abs(top[0]))
            if dtype == torch.float32 or top[0] - top[1] > 2 * tol:
                fail(
                    f"generated {got.sequences[b, -steps:].tolist()} where vanilla generated "
                    f"{new[b].tolist()} (sequence {b}, step {last}: not a near tie)"
                )
            parted += 1
    note = f", {parted} parted at a near tie" if parted else ""
    print(f"  check: {what} generates vanilla's tokens (logits {worst:.2g} x tolerance{note})")
