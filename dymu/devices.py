"""Which device to run on: the user's ``--device``, checked before any work starts."""

from __future__ import annotations

import os

import torch

from .errors import DyMUError


def resolve_device(name: str | None) -> str:
    """The device asked for, or a one-line :class:`DyMUError` saying why it cannot be used.

    No name means this rank's GPU when there is one, else the CPU; a bare ``cuda`` means this
    rank's GPU (``LOCAL_RANK`` under torchrun), so every process gets its own.
    """
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name is None:
        return f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DyMUError(
            f"unknown device {name!r}: use cpu, cuda, cuda:N or mps (torch's device names)"
        ) from None
    if device.type == "cuda":
        return _cuda(name, local if device.index is None else device.index)
    if device.type == "meta":
        raise DyMUError("--device meta holds no data: use cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DyMUError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    try:  # any other backend: can it hold a tensor here?
        torch.empty(0, device=device)
    except Exception as exc:  # backends fail in their own ways (RuntimeError, ImportError...)
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].split(". ")[0]
        raise DyMUError(f"device {name!r} is not usable here: {reason}") from None
    return str(device)


def _cuda(name: str, index: int) -> str:
    if not torch.cuda.is_available():
        built = "with" if torch.version.cuda else "without"
        raise DyMUError(
            f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, built "
            f"{built} CUDA); use --device cpu"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DyMUError(f"--device {name}: this machine has {count} GPU(s): cuda:0..{count - 1}")
    return f"cuda:{index}"
