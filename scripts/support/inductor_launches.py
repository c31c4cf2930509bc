"""Kernel launches in the code inductor makes, the count a compiled call stands for in
``op_counter``'s tallies: a fused merge step (``compiled_launches``) or a whole module compiled
in place (``compiled_call_launches``). Inductor's output code is read line by line: its own
fused kernels (C++ on a CPU, standing in for the Triton kernels a GPU would get), extern
kernels and the ATen ops it falls back to."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes

_LAUNCHES: dict[tuple, int] = {}
# a kernel launch in inductor's output code: its own kernels (C++ or Triton), extern kernels,
# ATen ops it falls back to
_LAUNCH = re.compile(r"^\s+(?:\w+ = )?(?:cpp_fused_\w+\(|\w+\.run\(|extern_kernels\.\w+\(|"
                     r"(?:torch\.ops\.)?aten\.\w+\.\w+\()")  # fmt: skip


def compiled_launches(fn: Callable, args: tuple) -> int:
    """Kernel launches of the code ``torch.compile`` makes for the fused merge step ``fn``
    called with ``args``: compiled once per kind of call (which inputs are given, their dtypes,
    integers that are 0 or 1, which dynamo specialises on), outside any dispatch mode and
    caches."""
    key = (fn.__name__, *map(_kind, args))
    if key not in _LAUNCHES:
        from torch._inductor import config as inductor
        from torch._inductor.utils import run_and_get_code

        step = torch.compile(fn, dynamic=True, fullgraph=True)
        with _disable_current_modes(), inductor.patch(fx_graph_cache=False):
            _, codes = run_and_get_code(step, *args)
        _LAUNCHES[key] = sum(launches_in(code) for code in codes)
    return _LAUNCHES[key]


def compiled_call_launches(module: torch.nn.Module, call: Callable[[], object]) -> tuple[int, int]:
    """(kernel launches, graphs) in the code inductor makes for ``call()`` with ``module``
    compiled in place (``module.compile(dynamic=True)``), from a fresh compile outside any
    cache; ``module`` runs eagerly again afterwards. The eager code dynamo leaves between
    graphs (at a graph break) is not counted."""
    from torch._inductor import config as inductor
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    module.compile(dynamic=True)
    try:
        with _disable_current_modes(), inductor.patch(fx_graph_cache=False):
            _, codes = run_and_get_code(call)
    finally:
        module._compiled_call_impl = None  # what nn.Module.compile set: eager again
        torch._dynamo.reset()
    return sum(launches_in(code) for code in codes), len(codes)


def _kind(arg: object) -> object:
    """What of an argument a compiled function's code depends on."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.device.type, arg.dim())
    if isinstance(arg, int) and not isinstance(arg, bool):
        return min(arg, 2)  # 0, 1, or any other
    return arg


def launches_in(code: str) -> int:
    """Kernel launches in the ``call`` function of one inductor output module."""
    head, _, body = code.partition("def call(")
    indent = len(head) - len(head.rstrip(" "))  # of the ``def``: the body is deeper
    count = 0
    for line in body.splitlines()[1:]:
        if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
            break  # the end of ``call``
        count += bool(_LAUNCH.match(line))
    return count
