"""DyMUEncoder: the block loop over a tower adapter, with variable-length output."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from ..engine.attention import check_mode
from ..engine.blocks import BatchThresholds, Merging, Tokens, catch_up, run_block, threshold_merging
from ..engine.deferred import auto_lag
from ..engine.fused import Fuses
from ..engine.packing import Packing, constant, upload
from ..errors import DyMUError, MissingThresholds
from ..thresholds import Thresholds, TowerIdentity
from ..towers.base import Inputs, TowerAdapter

log = logging.getLogger(__name__)


@dataclass(repr=False)
class EncoderOutput:
    """Padded, variable-length encoder output; ``lengths`` says how many rows are real."""

    tokens: torch.Tensor  # (B, L, D) block outputs (before the tower's final norm)
    lengths: torch.Tensor  # (B,) real tokens per image
    sizes: torch.Tensor  # (B, L) float32: original tokens per slot, 0 on padding
    groups: torch.Tensor  # (B, N0) int64: original token -> slot (-1: a padded input patch)
    pooled: torch.Tensor | None  # (B, E) image embedding, when the tower has a head
    block_lengths: torch.Tensor  # (B, blocks run): tokens per image after each block
    # ``lengths`` as the host knows them after the forward's one wait (no read needed)
    host_lengths: tuple[int, ...] | None = field(default=None, repr=False)
    # what feature heads read from earlier blocks (Qwen3-VL's DeepStack), one output each
    features: tuple[EncoderOutput, ...] = field(default=(), repr=False)
    # entries of ``groups`` per row as the host knows them, where rows differ (Qwen-VL's
    # dynamic resolution: units per frame); ``None``: every row is full
    host_inputs: tuple[int, ...] | None = field(default=None, repr=False)

    def to_list(self) -> list[torch.Tensor]:
        """One unpadded ``(L_i, D)`` tensor per image."""
        return [t[:n] for t, n in zip(self.tokens, self.lengths.tolist(), strict=True)]

    def __repr__(self) -> str:
        """Shapes and dtypes instead of values; ``lengths`` in full for the first images."""
        parts = []
        for f in fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            shown = _lengths_repr(value) if f.name == "lengths" else _tensor_repr(value)
            parts.append(f"{f.name}={shown}")
        return f"EncoderOutput({', '.join(parts)})"


class DyMUEncoder(Fuses, nn.Module):
    """A vision tower that merges tokens above per-block thresholds, per image.

    ``r`` is the per-block schedule (used for calibration; a block with ``r == 0`` never
    merges). ``select_layer`` follows transformers' ``hidden_states`` indexing (LLaVA uses
    -2): only the blocks up to it run. ``drop_cls`` removes the prefix tokens (class token,
    registers) from the output: LLaVA's 'patch' features. With ``fixed_r`` every image merges
    exactly ``r[l]`` tokens in block ``l`` (ToMe mode) and no thresholds are needed.
    ``attention`` says how images of different lengths attend (:mod:`dymu.engine.attention`:
    ``auto``, ``loop``, ``padded``, ``nested``, ``flex``); every way gives the same result.
    ``read_lag`` (an attribute): how many blocks after a threshold merge its new lengths are
    read (:mod:`dymu.engine.deferred`; ``None``: 1 on CUDA, 0 elsewhere); every lag gives the
    same result. ``fuse`` (an attribute): threshold merges run one compiled step instead of
    some 25 eager ops (:mod:`dymu.engine.fused`; ``None``: on CUDA only).
    """

    def __init__(
        self,
        tower: TowerAdapter,
        r: Sequence[int],
        thresholds: Thresholds | None = None,
        select_layer: int | None = None,
        drop_cls: bool = False,
        name: str | None = None,
        preprocess: Callable | None = None,
        fixed_r: bool = False,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.tower = tower
        self.attention = check_mode(attention)
        self.read_lag: int | None = None
        self.name = name or type(tower).__name__
        if len(r) != tower.num_blocks:
            raise DyMUError(
                f"schedule has {len(r)} entries but the tower has {tower.num_blocks} blocks"
            )
        self.r = [int(v) for v in r]
        total = tower.num_blocks
        if select_layer is not None and not -(total + 1) <= select_layer <= total:
            raise DyMUError(f"select_layer {select_layer} is out of range for {total} blocks")
        self.select_layer = select_layer
        self.num_run = total if select_layer is None else select_layer % (total + 1)
        self.drop_cls = drop_cls
        self.fixed_r = fixed_r
        self.num_prefix = tower.num_prefix_tokens
        # PIL image -> tower input: the model's own transform where known, else the family's
        self.preprocess: Callable = preprocess or tower.preprocess()
        self.pretrained = "unknown"  # recorded in threshold files
        self.schedule_name = "explicit:" + ",".join(map(str, self.r))
        self.thresholds: Thresholds | None = None
        self._rules: tuple[object, list[Merging | None]] | None = None  # (key, rules)
        if thresholds is not None:
            self.set_thresholds(thresholds)

    def __getstate__(self) -> dict:
        """Pickled (``torch.save`` of the module, ``copy.deepcopy``) without the per-block
        rules, closures made again at the next forward."""
        return {**self.__dict__, "_rules": None}

    @property
    def identity(self) -> TowerIdentity:
        """Which tower this is, as threshold files record it."""
        return TowerIdentity.of(
            self.name, self.tower.architecture(), self.tower.patch_weight, self.pretrained
        )

    def set_thresholds(self, thresholds: Thresholds, source: str = "thresholds") -> None:
        """Use these thresholds at inference (refused if made for another tower)."""
        thresholds.check_tower(self.identity, self.tower.num_blocks, source)
        file_r = thresholds.r.tolist()
        if file_r != self.r and any(self.r):
            log.warning(
                "thresholds were calibrated with r=%s, this encoder's schedule is r=%s",
                file_r,
                self.r,
            )
        self.thresholds = thresholds
        self._rules = None  # the per-block rules, made at the next forward

    @property
    def merges(self) -> bool:
        return any(self.r[: self.num_run])

    def extra_repr(self) -> str:
        """One line for ``print(encoder)``: the tower, its schedule and how it merges."""
        total = self.tower.num_blocks
        blocks = str(total) if self.num_run == total else f"{self.num_run} of {total}"
        return (
            f"name={self.name!r}, blocks={blocks}, r_total={sum(self.r)} "
            f"({self.schedule_name}), {self._merging_summary()}, "
            f"select_layer={self.select_layer}, drop_cls={self.drop_cls}"
        )

    def _merging_summary(self) -> str:
        if not self.merges:
            return "merging=off"
        if self.fixed_r:
            return "merging=fixed r"
        if self.thresholds is None:
            return "thresholds=None"
        merging = self.thresholds.merging_blocks()[: self.num_run]
        return f"thresholds={sum(t is not None for t in merging)} merging blocks"

    def forward(self, inputs: Inputs) -> EncoderOutput:
        """Encode images (pixels, or the dict a tower's processor gives); each keeps the
        tokens its content needs (with ``fixed_r``: each keeps the same number)."""
        r = self.r[: self.num_run]
        if not self.merges:
            return self._run(inputs, [None] * self.num_run)
        if self.fixed_r:
            return self._run(inputs, [Merging(fixed_r=v) if v > 0 else None for v in r])
        if self.thresholds is None:
            raise MissingThresholds(self.name)
        return self._run(inputs, self._threshold_rules(r), deferred=True)

    def _threshold_rules(self, r: list[int]) -> list[Merging | None]:
        """Every block's rule for ``self.thresholds``, made once for these thresholds and
        schedule (not at every forward)."""
        key = (self.thresholds, tuple(r), self.num_prefix)
        cached = self._rules
        if cached is None or cached[0][0] is not key[0] or cached[0][1:] != key[1:]:
            # towers without prefix tokens reorder every image at every merging block,
            # merges or not (the reference's batch path, which the published OneVision
            # results ran)
            self._rules = (key, threshold_merging(self.thresholds, r, self.num_prefix == 0))
        return self._rules[1]

    def calibrate(
        self, inputs: Inputs, r: Sequence[int] | None = None
    ) -> tuple[EncoderOutput, torch.Tensor, torch.Tensor]:
        """One calibration batch with the batch rule (all blocks run).

        Returns the output, the batch threshold of every block ``(L,)`` float64 and which
        blocks produced one ``(L,)`` bool. Stays on the device: new lengths are read
        ``read_lag`` blocks after each merge, as at inference (one wait per forward).
        """
        r = self.r if r is None else [int(v) for v in r]
        found = BatchThresholds(r, self.num_prefix, reorder_all=True)
        out = self._run(inputs, found.merging, num_run=self.tower.num_blocks, head=False,
                        deferred=True)  # fmt: skip
        return (out, *found.results(out.tokens.device))

    def _run(
        self,
        inputs: Inputs,
        merging: Sequence[Merging | None],
        num_run: int | None = None,
        head: bool = True,
        deferred: bool = False,
    ) -> EncoderOutput:
        tower, prefix = self.tower, self.num_prefix
        num_run = self.num_run if num_run is None else num_run
        x, lengths, host_lengths, groups = self._embed(inputs)
        packing = Packing.from_lengths(host_lengths, x.device)
        lag = None
        if deferred:
            lag = auto_lag(x.device) if self.read_lag is None else self.read_lag
        gaps = bool(packing.lengths) and min(host_lengths) < groups.shape[1]  # padded patches: -1
        tokens = Tokens(
            x, packing, lengths, None, groups, lag, gaps=gaps, fuse=self._fuses(x.device)
        )
        block_lengths = []
        for block in range(num_run):
            step = merging[block] if block < len(merging) else None
            tokens = run_block(tower, block, tokens, step, attention=self.attention)
            block_lengths.append(tokens.lengths)
        tokens = catch_up(tokens)  # the one wait of a deferred forward
        sizes = tokens.sizes
        if sizes is None:
            sizes = torch.ones(tokens.x.shape[0], device=x.device, dtype=torch.float32)
        padded, sizes = tokens.packing.pad(tokens.x), tokens.packing.pad(sizes)
        pooled = tower.pool(padded, sizes) if head and num_run == tower.num_blocks else None
        lengths = tokens.lengths
        out = EncoderOutput(
            tokens=padded,
            lengths=lengths,
            sizes=sizes,
            groups=tokens.groups,
            pooled=pooled,
            block_lengths=torch.stack(block_lengths, 1) if block_lengths else lengths[:, None],
            host_lengths=tokens.packing.lengths,
        )
        return _drop_prefix(out, prefix, tokens.gaps) if self.drop_cls and prefix else out

    def _embed(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
        """Packed embeddings ``(T, D)``, tokens per image (on the device and on the host) and
        the identity ``groups``.

        A padded input batch (SigLIP2) keeps only each image's real tokens; its padded
        patches get group -1.
        """
        param = next(self.tower.parameters())
        inputs = _to(inputs, param)
        x = self.tower.embed(inputs)
        bsz, n0, dim = x.shape
        dev = x.device
        real_lengths = self.tower.input_lengths(inputs)
        positions = constant(np.arange(n0), dev)
        if real_lengths is None:
            lengths = upload(np.full(bsz, n0), dev)  # made on the host: no kernel
            return x.reshape(bsz * n0, dim), lengths, [n0] * bsz, positions.expand(bsz, n0)
        lengths = real_lengths.to(dev)
        real = positions[None, :] < lengths[:, None]
        return x[real], lengths, lengths.tolist(), torch.where(real, positions, -1)


_SHOWN_LENGTHS = 8  # images whose lengths EncoderOutput's repr lists


def _tensor_repr(t: torch.Tensor | None) -> str:
    """``(2, 197, 768) float32``, with the device when it is not the CPU."""
    if t is None:
        return "None"
    where = "" if t.device.type == "cpu" else f" {t.device}"
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}{where}"


def _lengths_repr(lengths: torch.Tensor) -> str:
    values = lengths.tolist()
    shown = [str(v) for v in values[:_SHOWN_LENGTHS]]
    return "[" + ", ".join(shown + (["..."] if len(values) > _SHOWN_LENGTHS else [])) + "]"


def _to(inputs: Inputs, param: torch.Tensor) -> Inputs:
    """Inputs on the tower's device; floating-point tensors in its dtype."""

    def move(t: torch.Tensor) -> torch.Tensor:
        dtype = param.dtype if t.is_floating_point() else t.dtype
        if param.device.type == "cuda" and t.device.type == "cpu":
            # from pinned memory without blocking: a copy from pageable memory would make the
            # host wait for the GPU to finish the previous batch
            t = t.pin_memory().to(param.device, non_blocking=True)
        return t.to(device=param.device, dtype=dtype)

    if isinstance(inputs, torch.Tensor):
        return move(inputs)
    return {key: move(value) for key, value in inputs.items()}


def _drop_prefix(out: EncoderOutput, prefix: int, gaps: bool) -> EncoderOutput:
    """LLaVA-style 'patch' features: the prefix tokens (always the first slots) removed
    (``gaps``: groups hold -1, which stays)."""
    groups = out.groups[:, prefix:]
    host = None if out.host_lengths is None else tuple(n - prefix for n in out.host_lengths)
    return EncoderOutput(
        tokens=out.tokens[:, prefix:],
        lengths=out.lengths - prefix,
        sizes=out.sizes[:, prefix:],
        groups=torch.where(groups < 0, groups, groups - prefix) if gaps else groups - prefix,
        pooled=out.pooled,
        block_lengths=out.block_lengths - prefix,
        host_lengths=host,
    )
