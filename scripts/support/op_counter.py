"""A counter of what a GPU would see per forward, run on any device: kernel-launching ATen
ops, blocking host reads and blocking uploads (used by ``scripts/bench_overhead.py`` and
``tests/test_overhead.py``).

**Kernel-launching ops** (``ops``): every ATen op reaching a ``TorchDispatchMode`` whose schema
returns a tensor that is not a view of an input, i.e. computes or writes data: functional ops,
in-place and ``out=`` ops, copies. Not counted: views and metadata ops (every tensor return
aliases an input without writing it: ``view``, ``_unsafe_view``, ``expand``, ``as_strided``,
``t``, ``transpose``, ``permute``, ``(un)squeeze``, ``slice``, ``select``, ``alias``,
``detach``, ``split``/``chunk``/``unbind``, ``lift_fresh``, ...; ops whose schema allows a view
but that copied, as ``to``, ``reshape`` or ``contiguous`` under ``inference_mode`` may, count
when an output has storage of its own), ops returning no tensor
(``sym_size``, ``item``: a host read, below), allocations and in-place metadata
changes (``NO_KERNEL``: ``empty``, ``empty_strided``, ``resize_``, ``detach_``, ...). One op may
launch zero or a few CUDA kernels, so this is a proxy, the one issue 19's budget is stated in
(dymu at most 3x the vanilla tower's ops in eager mode).

**Where data lives.** On a CPU run the CPU stands in for the device, so the counter tracks
which tensors hold the device's data: the model's parameters and buffers, the inputs, what
factory ops make (``arange``, ``full``, ...: library code passes ``device=``), what
``torch.tensor``/``torch.as_tensor``/``Tensor.to`` are given a ``device`` for, and whatever ops
derive from these. Everything else is host data (threshold values, lists made into tensors
without a device); reading it costs nothing. ``Tensor.to`` a ``torch.device`` on a CPU run means
the model's device; ``.to('cpu')`` (a string), a ``non_blocking`` ``.to`` of device data and
``.cpu()`` mean the host.

**Host reads** (``reads``): the distinct points where the host waits for device data, each
counted once:

* a call of ``Tensor.tolist`` (one read, whatever its length; it dispatches no op on the CPU)
  and ``.cpu()`` of device data (``Tensor.tolist``, ``Tensor.to``, ``Tensor.cpu``,
  ``torch.tensor`` and ``torch.as_tensor`` are wrapped while counting, then restored);
* ``SCALAR_READS``: ``_local_scalar_dense`` and the composites that reach the counter in its
  place under ``inference_mode`` (``item``, ``is_nonzero``, ``equal``, ``allclose``): what
  ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``t.__index__`` (a tensor used as a size
  or an index) run;
* ops whose output shape depends on data, which read a size back on a GPU
  (``DATA_DEPENDENT``: ``nonzero``, ``where(cond)``, ``masked_select``, ``bincount``, the
  ``unique`` family, ...), boolean indexing (``index``/``index_put`` with a bool or uint8
  index: ``x[mask]``, ``x[mask] = values``; not ``x[mask] = value``, a ``masked_fill_``) and
  ``repeat_interleave`` with a tensor of repeats and no ``output_size``;
* on a device run, a blocking ``_to_copy``/``to``/``copy_`` from device to host.

**Uploads** (``uploads``): blocking copies of host data to the device, a sync too: CUDA copies
from pageable memory without ``non_blocking`` run ``cudaStreamSynchronize`` (pytorch issue
120996): ``torch.tensor(list, device=...)``, ``Tensor.to(device)`` of host data; empty ones
move nothing and are not counted. Not counted anywhere: ``non_blocking`` copies, and waiting on
a CUDA event (invisible on the CPU).

**The fused merge step** (``dymu.engine.fused``; encoders with ``fuse=True``) is compiled
code, which dynamo does not run under a dispatch mode: there it runs eagerly, uncounted, and
counts as the launches of the code ``torch.compile`` makes for the same arguments (inductor's
output code: its fused kernels, extern kernels and ATen calls), compiled once per kind of call
outside the counter. On a CPU that is inductor's C++ code, whose fusion stands in for the
Triton kernels a GPU would get.

"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from dymu.engine import fused

from .inductor_launches import compiled_launches

ROOT = Path(__file__).resolve().parent.parent
aten = torch.ops.aten
# ops that allocate, or change a tensor's metadata in place, writing no data: no kernel
NO_KERNEL = {
    aten.empty,
    aten.empty_like,
    aten.empty_strided,
    aten.new_empty,
    aten.new_empty_strided,
    aten.resize_,
    aten.resize_as_,
    aten.set_,
    aten.detach_,
    aten.squeeze_,
    aten.unsqueeze_,
    aten.t_,
    aten.transpose_,
    aten.swapaxes_,
    aten.swapdims_,
    aten.as_strided_,
}
# ops that hand the host a value computed on the device (what .item(), int(t), bool(t),
# t.__index__ run; under inference_mode some arrive as these composites, not decomposed)
SCALAR_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose}
# ops whose output shape depends on the data: a GPU reads a size back before they return
DATA_DEPENDENT = {
    aten.nonzero,
    aten.nonzero_numpy,
    aten.argwhere,
    aten.masked_select,
    aten.bincount,
    aten.unique_dim,
    aten._unique,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
}
BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
COPIES = {aten._to_copy, aten.copy_, aten.to}
_MISSING = object()
TORCH_DIR = str(Path(torch.__file__).resolve().parent)


@dataclass
class Count:
    """What one counted forward did."""

    ops: int = 0
    host_reads: int = 0
    uploads: int = 0
    ops_by_name: Counter = field(default_factory=Counter)
    sites: Counter = field(default_factory=Counter)  # 'read file:line', 'upload file:line'

    @property
    def syncs(self) -> int:
        return self.host_reads + self.uploads


class OverheadCounter(TorchDispatchMode):
    """Counts kernel-launching ATen ops, blocking host reads and blocking uploads (see the
    module docstring) while active and ``counting``.

    ``device_tensors`` (parameters, buffers, inputs) are where the device's data starts; what
    ops derive from them is tracked, so that on a CPU run reads of host-resident tensors
    (threshold values, lists turned into tensors) are told apart from reads of the device's
    data. ``Tensor.tolist``, ``Tensor.to``, ``Tensor.cpu``, ``torch.tensor`` and
    ``torch.as_tensor`` are wrapped meanwhile (on a CPU they move nothing and dispatch no
    copy) and restored on exit."""

    def __init__(self, device_tensors: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.count = Count()
        self.counting = True
        self._on_device = WeakTensorKeyDictionary()
        tensors = list(device_tensors)
        for t in tensors:
            self._on_device[t] = True
        # on a CPU run the CPU stands in for the device too: residence is tracked
        self.simulated = all(t.device.type == "cpu" for t in tensors)
        self._wrapped = 0  # inside a wrapped call, which counts for what it dispatches
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> OverheadCounter:
        for owner, name, wrap in (
            (torch.Tensor, "tolist", self._wrap_tolist),
            (torch.Tensor, "to", self._wrap_to),
            (torch.Tensor, "cpu", self._wrap_cpu),
            (torch, "tensor", self._wrap_tensor),
            (torch, "as_tensor", self._wrap_tensor),
            (fused.FusedStep, "__call__", self._wrap_fused),
        ):
            self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
            setattr(owner, name, wrap(getattr(owner, name)))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()
        super().__exit__(*exc)

    def on_device(self, t: object) -> bool:
        """Whether ``t`` holds the device's data (on a CPU run: derived from it)."""
        return isinstance(t, torch.Tensor) and (t.device.type != "cpu" or t in self._on_device)

    def record(self, kind: str) -> None:
        """One blocking ``'read'`` or ``'upload'``, at the caller's line."""
        if not self.counting:
            return
        if kind == "read":
            self.count.host_reads += 1
        else:
            self.count.uploads += 1
        self.count.sites[f"{kind} {caller()}"] += 1

    @contextmanager
    def _inside(self) -> Iterator[None]:
        self._wrapped += 1
        try:
            yield
        finally:
            self._wrapped -= 1

    def _wrap_tolist(self, tolist: Callable) -> Callable:
        def counted_tolist(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.on_device(t):
                self.record("read")
            with self._inside():
                return tolist(t, *args, **kwargs)

        return counted_tolist

    def _wrap_to(self, to: Callable) -> Callable:
        def counted_to(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            with self._inside():
                out = to(t, *args, **kwargs)
            if device is None:
                return out
            if self.simulated:  # 'cpu' named as a string, or an asynchronous read, mean the host
                named = args[0] if args else kwargs.get("device")
                to_host = isinstance(named, str) or (non_blocking and self.on_device(t))
            else:
                to_host = device.type == "cpu"
            return self._moved(t, out, to_host, non_blocking)

        return counted_to

    def _wrap_cpu(self, cpu: Callable) -> Callable:
        def counted_cpu(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            with self._inside():
                out = cpu(t, *args, **kwargs)
            return self._moved(t, out, True, False)

        return counted_cpu

    def _wrap_tensor(self, make: Callable) -> Callable:
        def counted_tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            with self._inside():
                out = make(data, *args, **kwargs)
            device = kwargs.get("device", args[1] if len(args) > 1 else None)
            if device is None:
                return out
            to_host = torch.device(device).type == "cpu" and not self.simulated
            return self._moved(data, out, to_host, False)

        return counted_tensor

    def _wrap_fused(self, call: Callable) -> Callable:
        def counted_fused(step: fused.FusedStep, *args: Any) -> Any:
            launches = compiled_launches(step.fn, args) if not step.failed else None
            counting, self.counting = self.counting, self.counting and launches is None
            try:
                out = call(step, *args)  # eager under this mode; counted as itself if uncompiled
            finally:
                self.counting = counting
            if counting and launches is not None:
                self.count.ops += launches
                self.count.ops_by_name["fused merge step"] += launches
            return out

        return counted_fused

    def _moved(self, src: object, out: torch.Tensor, to_host: bool, non_blocking: bool):
        """``out``, ``src`` copied to the host or the device: a blocking copy across counts;
        on a CPU run, where the copy is ``src`` itself, an alias of it resides there."""
        from_device = self.on_device(src)
        if from_device != to_host or out.numel() == 0:  # stays on its side, or moves nothing
            return out
        if not non_blocking:
            self.record("read" if from_device else "upload")
        if out is src:
            out = aten.alias(out)  # dispatched here: marked as src is, fixed below
        if to_host:
            self._on_device.pop(out, None)
        else:
            self._on_device[out] = True
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = tensors((args, kwargs))
        device = any(map(self.on_device, inputs)) if inputs else True  # factory ops: device
        if device:
            for t in tensors(out):
                self._on_device[t] = True
        if not self._wrapped:
            if device and reads_host(func, args, kwargs):
                self.record("read")
            elif kind := blocking_transfer(func, args, kwargs, out):
                self.record(kind)
        if self.counting and launches_kernel(func, args, kwargs, out):
            self.count.ops += 1
            self.count.ops_by_name[str(func.overloadpacket.__name__)] += 1
        return out


def launches_kernel(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object) -> bool:
    """Whether an op computes or writes data (not a view, a metadata query or an allocation)."""
    if func.overloadpacket in NO_KERNEL:
        return False
    returns = [r for r in func._schema.returns if "Tensor" in str(r.type)]
    if all(r.alias_info is None or r.alias_info.is_write for r in returns):
        return bool(returns)
    # a view by its schema; composites (to, reshape, contiguous, ...) may copy instead
    inputs = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
    return any(t.numel() and t.untyped_storage().data_ptr() not in inputs for t in tensors(out))


def tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def reads_host(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether an op on device data blocks the host until the device has computed a value."""
    packet = func.overloadpacket
    if packet in SCALAR_READS or packet in DATA_DEPENDENT or func is aten.where.default:
        return True  # where(cond) with one argument is nonzero(cond, as_tuple=True)
    if packet is aten.repeat_interleave and func is not aten.repeat_interleave.self_int:
        at = [a.name for a in func._schema.arguments].index("output_size")
        return kwargs.get("output_size", args[at] if len(args) > at else None) is None
    if packet in BOOL_INDEXED:
        indices = [i for i in (args[1] if len(args) > 1 else kwargs["indices"]) if i is not None]
        if not any(i.dtype in (torch.bool, torch.uint8) for i in indices):
            return False
        # x[mask] = one value runs masked_fill_, which reads nothing back
        values = args[2] if len(args) > 2 else kwargs.get("values")
        return packet is aten.index or len(indices) > 1 or values.numel() != 1
    return False


def blocking_transfer(
    func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object
) -> str | None:
    """``'read'`` or ``'upload'``: a copy between host and device without ``non_blocking``
    (a device run's; on a CPU run ``OverheadCounter``'s wrappers count them)."""
    if func.overloadpacket not in COPIES:
        return None
    names = [a.name for a in func._schema.arguments]
    at = names.index("non_blocking") if "non_blocking" in names else len(args)
    if kwargs.get("non_blocking", args[at] if len(args) > at else False):
        return None
    if func.overloadpacket is aten.copy_:
        src, dst = args[1].device, args[0].device
    else:
        src, dst = args[0].device, tensors(out)[0].device
    if (src.type == "cpu") == (dst.type == "cpu"):
        return None
    return "upload" if src.type == "cpu" else "read"


def caller() -> str:
    """``file:line`` of the innermost frame outside torch and this counter."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(TORCH_DIR) and name != __file__:
            break
        frame = frame.f_back
    if frame is None:
        return "?"
    path = Path(frame.f_code.co_filename)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path(*path.parts[-2:])
    return f"{shown}:{frame.f_lineno}"


def count_forward(fn: Callable[[], object], *roots: torch.nn.Module | torch.Tensor) -> Count:
    """Ops and host reads of the second call of ``fn`` (the first sets up what it caches);
    ``roots``: the modules whose parameters and buffers, and the tensors, it computes from."""
    device_tensors: list[torch.Tensor] = []
    for root in roots:
        if isinstance(root, torch.nn.Module):
            device_tensors += [*root.parameters(), *root.buffers()]
        else:
            device_tensors.append(root)
    with torch.inference_mode(), OverheadCounter(device_tensors) as counter:
        counter.counting = False
        fn()
        counter.counting = True
        fn()
    return counter.count
