"""DyMU in Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers: whole 2x2 units merged inside
windows.

Two choices, and why (README: Qwen2-VL and Qwen2.5-VL):

* **Units, not patches.** The tower's patch merger concatenates the 4 patches of a 2x2 unit
  into one LLM token. Merging single patches would leave most units mixed (two groups in one
  LLM token), and an LLM position whose unit mixes groups needs a slot of its own, so the
  language model, ~90% of the prefill, would barely shrink. So a merge joins two whole units,
  patch by patch (patch i of one with patch i of the other, size-weighted as every merge),
  and a merged unit is one LLM slot. A unit's metric is its 4 patches' head-mean keys, before
  the rotation, side by side; matching, rules and thresholds are the engine's, on units.
* **Inside windows.** Qwen2.5-VL attends inside 112-pixel windows in most blocks; a merge
  across two windows would leave a token in both. Merging only inside a window keeps every
  token in one window and the windows' order intact. Qwen2-VL and Qwen3-VL, which have no
  windows, merge inside windows of the same 4x4 units, so a schedule (merges per window per
  block) means the same in every family and does not depend on the image's resolution.

A merged unit keeps its destination's rotary position (ToMe's approximation; the exact
alternative, unmerging q/k inside the tower's attention, would keep the attention cost full).
Proportional attention adds ``log(size)`` to every patch of a merged unit. With nothing merged
the output is the tower's own, to float rounding.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..engine.attention import attend, check_mode
from ..engine.blocks import BatchThresholds, Merging, threshold_merging
from ..engine.deferred import auto_lag, compact
from ..engine.fused import Fuses
from ..engine.packing import Packing, constant, upload
from ..engine.units import Units, catch_up_units, lengths_by_block, merge_units
from ..errors import DyMUError, MissingThresholds
from ..thresholds import Thresholds, TowerIdentity
from ..towers.hf_qwen_vl import Embedded, QwenVisionTower
from .model import EncoderOutput

log = logging.getLogger(__name__)
# index_reduce_ (positions="unmerge") says once per process that its API is in beta
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta", category=UserWarning)

# how merged units meet the rotary embedding: ``keep`` the destination's position (the
# default), or ``unmerge`` q/k/v to every original unit inside attention (exact positions,
# full-length attention; for comparison: scripts/bench_qwen_positions.py)
POSITIONS = ("keep", "unmerge")


class QwenDyMUEncoder(Fuses, nn.Module):
    """A Qwen2-VL / Qwen2.5-VL vision tower that merges 2x2 units above per-block thresholds.

    ``r``: merges per window per block for calibration (a block with ``r == 0`` never
    merges); at inference the thresholds decide. ``forward(pixel_values, grid_thw)`` takes
    what the model's image processor gives and returns one :class:`EncoderOutput` row per
    frame (an image, or one temporal patch of a video): its merged LLM tokens (after the
    tower's patch merger), and ``groups``, the merged token of every unit in raster order.
    """

    fixed_r = False  # no ToMe mode for these towers: thresholds decide
    drop_cls = False  # no prefix tokens

    def __init__(
        self,
        tower: nn.Module,
        r: Sequence[int],
        thresholds: Thresholds | None = None,
        name: str | None = None,
        attention: str = "auto",
        positions: str = "keep",
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise DyMUError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
        self.positions = positions
        self.tower = tower if isinstance(tower, QwenVisionTower) else QwenVisionTower(tower)
        if len(r) != self.tower.num_blocks:
            raise DyMUError(
                f"schedule has {len(r)} entries but the tower has {self.tower.num_blocks} blocks"
            )
        self.r = [int(v) for v in r]
        self.attention = check_mode(attention)
        self.name = name or type(self.tower.tower).__name__
        self.pretrained = "unknown"
        self.schedule_name = "explicit:" + ",".join(map(str, self.r))
        self.thresholds: Thresholds | None = None
        self._rules: tuple | None = None  # ((thresholds, r), per-block rules)
        # blocks between a threshold merge and the read of its lengths (None: 1 on CUDA, 0
        # elsewhere); every lag gives the same result
        self.read_lag: int | None = None
        # PIL image -> processor output (the factory sets the model folder's own processor)
        self.preprocess = self.tower.preprocess()
        if thresholds is not None:
            self.set_thresholds(thresholds)

    def __getstate__(self) -> dict:
        """Pickled (``torch.save`` of the module, ``copy.deepcopy``) without the per-block
        rules, closures made again at the next forward."""
        return {**self.__dict__, "_rules": None}

    @property
    def identity(self) -> TowerIdentity:
        tower = self.tower
        return TowerIdentity.of(
            self.name, tower.architecture(), tower.patch_weight, self.pretrained
        )

    @property
    def merges(self) -> bool:
        return any(self.r)

    def set_thresholds(self, thresholds: Thresholds, source: str = "thresholds") -> None:
        """Use these thresholds at inference (refused if made for another tower)."""
        thresholds.check_tower(self.identity, self.tower.num_blocks, source)
        self.thresholds = thresholds

    def forward(
        self, pixel_values: torch.Tensor | Mapping, grid_thw: torch.Tensor | None = None
    ) -> EncoderOutput:
        """Encode a processor's batch; every unit group keeps what its content needs."""
        emb = self.tower.embed(*_inputs(pixel_values, grid_thw))
        if not self.merges:
            return self._run(emb, [None] * self.tower.num_blocks)
        if self.thresholds is None:
            raise MissingThresholds(self.name)
        key = (self.thresholds, tuple(self.r))
        if self._rules is None or self._rules[0][0] is not key[0] or self._rules[0][1] != key[1]:
            self._rules = (key, threshold_merging(self.thresholds, self.r, False))  # made once
        return self._run(emb, self._rules[1])

    def calibrate(
        self, inputs: Mapping | torch.Tensor, r: Sequence[int] | None = None
    ) -> tuple[EncoderOutput, torch.Tensor, torch.Tensor]:
        """One calibration batch with the batch rule: ``r[l]`` merges per window in block
        ``l`` across the batch (as :meth:`dymu.DyMUEncoder.calibrate`)."""
        r = self.r if r is None else [int(v) for v in r]
        found = BatchThresholds(r, prefix=0, reorder_all=False)
        out = self._run(
            self.tower.embed(*_inputs(inputs, None)),
            found.merging,
            heads=False,  # thresholds need no DeepStack features
        )
        return (out, *found.results(out.tokens.device))

    def _run(
        self,
        emb: Embedded,
        merging: Sequence[Merging | None],
        heads: bool = True,
    ) -> EncoderOutput:
        """The block loop over units in window order; merges keep to their windows and read
        their new lengths ``read_lag`` blocks later (:mod:`dymu.engine.units`; ``heads``: also
        run the DeepStack feature heads)."""
        tower, unit, device = self.tower, self.tower.unit, emb.x.device
        start = Packing.from_lengths(emb.window_units, device)
        lag = auto_lag(device) if self.read_lag is None else self.read_lag
        state = Units(
            emb.x,
            emb.rope,
            start,
            upload(np.asarray(emb.window_units), device),
            unit,
            groups=start.pad(constant(_positions(emb.window_units), device), -1).long(),
            lag=lag,
            fuse=self._fuses(device),
        )
        features, memo = [], {}  # memo: this forward's packings and log sizes, made once
        for block in range(tower.num_blocks):
            state = catch_up_units(state, block) if lag else state
            x = state.x
            q, k, v = tower.qkv(block, x)
            x = x + tower.attn_out(block, self._attend(block, (q, k, v), state, emb, start, memo))
            state = replace(state, x=x)
            if merging[block] is not None and state.windows.width >= 2:
                keys = k.view(-1, unit, tower.num_heads, tower.head_dim)
                state = merge_units(state, keys, merging[block], block)
                state = catch_up_units(state, block) if lag == 0 else state
            state = replace(state, x=state.x + tower.mlp(block, state.x))
            if heads and block in tower.feature_blocks:  # DeepStack: this block's tokens too
                features.append((block, tower.feature_head(block, state.x), state))
        state = catch_up_units(state)  # the one wait of a deferred forward
        out = _output(tower.merger(state.x), state, start, emb, tower.num_blocks)
        out.features = tuple(_head_output(f, state, start, emb) for f in features)
        return out

    def _attend(
        self, block: int, qkv, state: Units, emb: Embedded, start: Packing, memo: dict
    ) -> torch.Tensor:
        """The block's attention: per window or frame, ``log(size)`` on every patch of a
        merged unit (or, ``positions="unmerge"``, at the original units). ``memo`` keeps
        what blocks between two merges share: patch packings and per-patch log sizes."""
        tower, unit, windows, sizes = self.tower, state.unit, state.windows, state.sizes
        if self.positions == "unmerge" and sizes is not None:
            rows = _patch_rows(state.groups, windows, start, unit)
            if memo.get("unmerged") is not sizes:  # each patch row's share of its group
                share = sizes.float().clamp(min=1.0).reciprocal().repeat_interleave(unit)
                memo["unmerged"], memo["share"] = sizes, share[:, None]
            return self._attend_unmerged(block, qkv, rows, memo["share"], emb, memo)
        q, k, v = qkv
        qr, kr = tower.rotate(q, k, state.rope)
        seg = windows.lengths if tower.windowed[block] else _frames(windows.lengths, emb)
        patches = _patches(memo, seg, unit, q.device)
        log_sizes = None
        if sizes is not None:  # made again only when sizes change (a merge, a compaction)
            if memo.get("sizes") is not sizes:
                memo["sizes"], memo["log"] = sizes, sizes.log().repeat_interleave(unit)
            log_sizes = memo["log"]
        return attend(qr, kr, v, tower.num_heads, patches, log_sizes, self.attention)

    def _attend_unmerged(
        self,
        block: int,
        qkv: tuple[torch.Tensor, ...],
        rows: torch.Tensor,
        share: torch.Tensor,
        emb: Embedded,
        memo: dict,
    ) -> torch.Tensor:
        """Attention with every merged unit unmerged to its original units (virtual
        unmerging inside the tower): q/k/v gathered to the original patches, rotated at their
        own positions, attended at full length (a key repeated over its group is what
        ``log(size)`` stands for), and each group's outputs averaged back: summed into the
        current rows and scaled by ``share`` (``(T, 1)``: one over the group's size, the
        number of original patches that read a row; a dead row reads none and stays 0), as
        VTU averages (``index_reduce_``'s mean counts the groups again at every call)."""
        tower, unit = self.tower, self.tower.unit
        q, k, v = (t.index_select(0, rows) for t in qkv)
        q, k = tower.rotate(q, k, emb.rope)
        seg = emb.window_units if tower.windowed[block] else emb.frame_units
        patches = _patches(memo, seg, unit, q.device)
        out = attend(q, k, v, tower.num_heads, patches, None, self.attention)
        acc = out.new_zeros(qkv[0].shape, dtype=torch.float32).index_add_(0, rows, out.float())
        return acc.mul_(share).to(out.dtype)


def _patches(memo: dict, units: list[int], unit: int, device: torch.device) -> Packing:
    """The packing of patches for segments of ``units`` units (made once per forward)."""
    key = ("patches", tuple(units))
    if key not in memo:
        memo[key] = Packing.from_lengths([n * unit for n in units], device)
    return memo[key]


def _patch_rows(groups: torch.Tensor, windows: Packing, start: Packing, unit: int) -> torch.Tensor:
    """``(P0,)``: the current packed row of every original patch (window order)."""
    lengths = np.asarray(windows.lengths)
    first = constant(np.cumsum(lengths) - lengths, groups.device)  # each window's first row
    units = start.pack(groups + first[:, None])  # (U0,) current unit of every original unit
    offsets = constant(np.arange(unit), groups.device)
    return (units[:, None] * unit + offsets).reshape(-1)


def _head_output(
    head: tuple[int, torch.Tensor, Units], final: Units, start: Packing, emb: Embedded
) -> EncoderOutput:
    """A DeepStack head's output, assembled after the forward's one wait: its tokens (dead
    units included while their lengths were on the way) kept to the lengths after its
    block, which the host knows by then."""
    block, tokens, state = head
    lengths = lengths_by_block(final, emb.window_units, block + 1)[-1].tolist()
    tokens, sizes, windows = compact(tokens, state.sizes, state.windows, lengths)
    state = replace(state, sizes=sizes, windows=windows, read=final.read, pending=())
    return _output(tokens, state, start, emb, block + 1)


def _output(
    features: torch.Tensor, state: Units, start: Packing, emb: Embedded, blocks: int
) -> EncoderOutput:
    """Per frame: its windows' merged tokens one after another, and every unit's token in
    raster order (window order undone by the tower's own ``window_index``)."""
    device, windows = features.device, state.windows
    frame_lengths = _frames(windows.lengths, emb)
    frames = Packing.from_lengths(frame_lengths, device)
    # a window's first token within its frame: its final lengths summed over earlier windows
    ends = np.cumsum(windows.lengths)
    first = ends - np.asarray(windows.lengths)
    frame_first = np.concatenate([[0], np.cumsum(frame_lengths)])[emb.window_frame]
    in_frame = start.pack(state.groups + constant(first - frame_first, device)[:, None])
    raster = torch.empty_like(in_frame).index_copy_(0, emb.window_index, in_frame)
    units = Packing.from_lengths(emb.frame_units, device)
    sizes = state.sizes
    if sizes is None:
        sizes = features.new_ones(features.shape[0], dtype=torch.float32)
    by_block = lengths_by_block(state, emb.window_units, blocks)  # (blocks, windows)
    per_block = np.stack([_frames(row, emb) for row in by_block], 1)  # (frames, blocks)
    return EncoderOutput(
        tokens=frames.pad(features),
        lengths=upload(np.asarray(frame_lengths), device),  # made on the host: no wait
        sizes=frames.pad(sizes),
        groups=units.pad(raster, -1).long(),
        pooled=None,
        block_lengths=upload(per_block, device),
        host_lengths=tuple(frame_lengths),
        host_inputs=tuple(emb.frame_units),
    )


def expand_units(out: EncoderOutput) -> torch.Tensor:
    """Every unit's merged token, in the tower's own output order (frames one after
    another, units in raster order): ``(U, out)``, what the unmodified tower's
    ``pooler_output`` holds, with each group's token repeated over its units."""
    rows = out.tokens.gather(
        1, out.groups.clamp(min=0)[..., None].expand(-1, -1, out.tokens.shape[-1])
    )
    return Packing.from_lengths(out.host_inputs, rows.device).pack(rows)  # no host read


def _frames(window_lengths, emb: Embedded) -> list[int]:
    """Units per frame: the windows' lengths summed per frame."""
    counts = np.bincount(emb.window_frame, np.asarray(window_lengths), len(emb.frame_units))
    return counts.astype(np.int64).tolist()


def _positions(lengths: list[int]) -> np.ndarray:
    """``0 .. n - 1`` for every segment, one after another."""
    return np.concatenate([np.arange(n) for n in lengths])


def _inputs(
    pixels: torch.Tensor | Mapping, grid_thw: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, grid_thw)`` from tensors or a processor's output (images or video)."""
    if isinstance(pixels, Mapping):
        for values, grid in (
            ("pixel_values", "image_grid_thw"),
            ("pixel_values_videos", "video_grid_thw"),
        ):
            if pixels.get(values) is not None:
                return pixels[values], pixels[grid]
        raise DyMUError("a Qwen-VL batch needs pixel_values with image_grid_thw (or videos)")
    if grid_thw is None:
        raise DyMUError("a Qwen-VL tower needs grid_thw beside its pixel values")
    return pixels, grid_thw
