"""Compiling a language model in place for the benchmarks' ``--compile`` rows, as a server
compiles the model it serves: inductor, dynamic shapes, vanilla and dymu alike."""

from __future__ import annotations

import torch

# transformers' decoders compile a variant per kind of call (prefill with and without a VTU
# mapping, decode steps, the first batch size above 1, kwargs given or not): past dynamo's
# default limit of 8 a frame would silently run eagerly again
RECOMPILE_LIMIT = 64


def compile_in_place(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` compiled in place (``module.compile(dynamic=True)``); each kind of call
    compiles at its first run, which the benchmarks leave untimed."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    module.compile(dynamic=True)
    return module
