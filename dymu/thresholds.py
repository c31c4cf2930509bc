"""Per-block similarity thresholds: their safetensors format (``thresholds/README.md``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import DyMUError

FORMAT = "dymu-thresholds/1"
_TENSORS = {
    "thresholds": torch.float32,
    "sum": torch.float64,
    "count": torch.int64,
    "r": torch.int64,
}
# metadata that must agree before partial results can be added together
_MERGE_KEYS = ("model", "pretrained", "schedule", "r_total", "batch_size")


@dataclass
class Thresholds:
    """Calibrated thresholds with the statistics they came from.

    ``thresholds[l] = sum[l] / count[l]``; a block with no statistics gets 1.0 (never merges).
    """

    sum: torch.Tensor
    count: torch.Tensor
    r: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    # the file it was read from (named in messages); None when made in memory
    path: Path | None = field(default=None, repr=False, compare=False)

    @property
    def thresholds(self) -> torch.Tensor:
        mean = self.sum / self.count.clamp(min=1).to(torch.float64)
        return torch.where(self.count > 0, mean, torch.ones_like(mean)).to(torch.float32)

    @property
    def num_blocks(self) -> int:
        return int(self.r.numel())

    def merging_blocks(self) -> list[float | None]:
        """Per block: the threshold as a float, or ``None`` where the block never merges."""
        return [
            float(t) if r > 0 and t < 1.0 else None
            for t, r in zip(self.thresholds.tolist(), self.r.tolist(), strict=True)
        ]

    def save(self, path: str | os.PathLike) -> None:
        """Write the safetensors file (atomically: a temporary file, then a rename)."""
        meta = {
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        meta.update({k: str(v) for k, v in self.metadata.items() if k not in ("format",)})
        tensors = {
            "thresholds": self.thresholds.contiguous(),
            "sum": self.sum.to(torch.float64).contiguous(),
            "count": self.count.to(torch.int64).contiguous(),
            "r": self.r.to(torch.int64).contiguous(),
        }
        atomic_save(tensors, path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Thresholds:
        """Read and validate a thresholds file; every problem is a :class:`DyMUError`."""
        path = Path(path)
        if not path.is_file():
            raise DyMUError(f"thresholds file not found: {path}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise DyMUError(
                f"{path} is not a dymu thresholds file (not safetensors: {exc})"
            ) from None
        if metadata.get("format") != FORMAT:
            raise DyMUError(
                f"{path} is not a dymu thresholds file (format is {metadata.get('format')!r})"
            )
        for key, dtype in _TENSORS.items():
            if key not in tensors:
                raise DyMUError(f"{path} has no {key!r} tensor")
            if tensors[key].dim() != 1 or tensors[key].dtype != dtype:
                raise DyMUError(f"{path}: {key!r} must be a 1-d {dtype} tensor")
        sizes = {k: tensors[k].numel() for k in _TENSORS}
        if len(set(sizes.values())) != 1:
            raise DyMUError(f"{path}: tensors disagree on the number of blocks: {sizes}")
        _check_values(tensors["thresholds"], str(path))
        out = cls(tensors["sum"], tensors["count"], tensors["r"], metadata)
        stored = tensors["thresholds"]
        if not torch.allclose(out.thresholds[out.count > 0], stored[out.count > 0]):
            # a hand-edited or converted file: keep the stored values, they are what the user means
            out = cls.from_values(stored, tensors["r"], metadata)
        out.path = path
        return out

    @classmethod
    def from_values(
        cls, thresholds: torch.Tensor, r: torch.Tensor, metadata: dict[str, str] | None = None
    ) -> Thresholds:
        """Thresholds given directly (one observation each), e.g. converted from elsewhere."""
        values = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
        _check_values(values, "thresholds")
        return cls(
            values.clone(),
            torch.ones_like(values, dtype=torch.int64),
            torch.as_tensor(r, dtype=torch.int64).flatten(),
            dict(metadata or {}),
        )

    @classmethod
    def from_reference_checkpoint(
        cls, path: str | os.PathLike, num_blocks: int, r: list[int], metadata: dict[str, str]
    ) -> Thresholds:
        """Read a published DyMU checkpoint: one ``threshold`` buffer per block.

        The state dict may sit under ``state_dict`` (or ``model``/``module``) and carry
        ``module.`` prefixes; keys look like ``...resblocks.3.threshold`` or
        ``blocks.3.threshold``. The number of thresholds must equal ``num_blocks``.
        """
        path = Path(path)
        if not path.is_file():
            raise DyMUError(f"checkpoint not found: {path}")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors alike
            raise DyMUError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise DyMUError(f"{path} holds no state dict")
        found: dict[int, float] = {}
        for key, value in state.items():
            parts = str(key).split(".")
            if parts[-1] != "threshold" or not torch.is_tensor(value) or value.numel() != 1:
                continue
            index = next((int(p) for p in reversed(parts[:-1]) if p.isdigit()), None)
            if index is None:
                raise DyMUError(f"{path}: cannot tell the block of {key!r}")
            found[index] = float(value)
        if not found:
            raise DyMUError(f"{path} has no 'threshold' entries (not a DyMU checkpoint?)")
        if sorted(found) != list(range(len(found))) or len(found) != num_blocks:
            raise DyMUError(
                f"{path} has thresholds for {len(found)} blocks (indices {min(found)}.."
                f"{max(found)}) but {metadata.get('model', 'the model')} has {num_blocks}"
            )
        values = torch.tensor([found[i] for i in range(num_blocks)], dtype=torch.float64)
        meta = dict(metadata, source=f"converted from {path.name}")
        return cls.from_values(values, torch.tensor(r), meta)

    def check_tower(
        self, tower: TowerIdentity, num_blocks: int, source: str = "thresholds"
    ) -> None:
        """Refuse thresholds made for another tower (shape or weights), naming both."""
        made_for = self.metadata.get("tower") or self.metadata.get("model") or "an unknown model"
        if self.num_blocks != num_blocks:
            raise DyMUError(
                f"{source} has {self.num_blocks} blocks but {tower.label} has {num_blocks}"
                f" (file made for {made_for})"
            )
        mine = TowerIdentity.from_metadata(self.metadata)
        if mine is None:  # a file without a tower record: compare dymu names, if both are
            model = self.metadata.get("model", "")
            base, other = model.split("-tome")[0], tower.label.split("-tome")[0]
            if "-tome" in model and "-tome" in tower.label and base != other:
                raise DyMUError(f"{source} was made for {model}, not for {tower.label}")
            return
        if mine.architecture != tower.architecture:
            raise DyMUError(
                f"{source} was made for {mine.label} ({mine.architecture}), "
                f"not for {tower.label} ({tower.architecture})"
            )
        if not mine.same_weights(tower):
            raise DyMUError(
                f"{source} was made for {mine.label} with weights {mine.source!r}, not for "
                f"{tower.label} with weights {tower.source!r} (weight fingerprints "
                f"{mine.fingerprint} vs {tower.fingerprint})"
            )

    def merge(self, other: Thresholds) -> Thresholds:
        """Add the statistics of a partial result made for the same model and schedule."""
        for key in _MERGE_KEYS:
            mine, theirs = self.metadata.get(key), other.metadata.get(key)
            if mine != theirs:
                raise DyMUError(f"cannot merge thresholds: {key} differs ({mine!r} vs {theirs!r})")
        mine, theirs = (TowerIdentity.from_metadata(t.metadata) for t in (self, other))
        if (mine is None) != (theirs is None) or (
            mine is not None
            and (mine.architecture != theirs.architecture or not mine.same_weights(theirs))
        ):
            raise DyMUError("cannot merge thresholds: they were made for different towers")
        if not torch.equal(self.r, other.r):
            raise DyMUError("cannot merge thresholds: per-block r differs")
        meta = dict(self.metadata)
        meta["images"] = str(int(meta.get("images", 0)) + int(other.metadata.get("images", 0)))
        return Thresholds(self.sum + other.sum, self.count + other.count, self.r.clone(), meta)


@dataclass(frozen=True)
class TowerIdentity:
    """Which tower thresholds fit: a label for messages, the tower's shape (family-neutral,
    so open_clip's and transformers' copies of one CLIP agree) and a fingerprint of its
    weights: mean and mean absolute value of the first output channels of the patch
    embedding. Order-invariant within a channel (conv and linear patch layouts agree) and
    tolerant of precision (fp32, fp16 and bf16 copies agree), while two different weight
    sets differ by far more than the tolerance."""

    label: str
    architecture: str
    weights: tuple[float, ...]
    source: str = "unknown"  # where the weights came from (an open_clip tag, 'local', ...)

    @classmethod
    def of(
        cls, label: str, architecture: str, patch_weight: torch.Tensor, source: str = "unknown"
    ) -> TowerIdentity:
        rows = patch_weight.detach()[:_FINGERPRINT_ROWS]
        rows = rows.reshape(rows.shape[0], -1).to(device="cpu", dtype=torch.float64)
        stats = torch.stack([rows.mean(1), rows.abs().mean(1)], 1)
        return cls(label, architecture, tuple(stats.flatten().tolist()), source)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> TowerIdentity | None:
        if "tower_arch" not in metadata or "tower_weights" not in metadata:
            return None
        try:
            weights = tuple(float(v) for v in metadata["tower_weights"].split(","))
        except ValueError:
            raise DyMUError(f"bad tower_weights {metadata['tower_weights']!r}") from None
        label = metadata.get("tower", metadata.get("model", "?"))
        return cls(label, metadata["tower_arch"], weights, metadata.get("pretrained", "unknown"))

    @property
    def fingerprint(self) -> str:
        return ",".join(f"{v:.6g}" for v in self.weights)

    def metadata(self) -> dict[str, str]:
        return {
            "tower": self.label,
            "tower_arch": self.architecture,
            "tower_weights": self.fingerprint,
        }

    def same_weights(self, other: TowerIdentity, tolerance: float = 0.02) -> bool:
        """Equal fingerprints up to ``tolerance`` of each channel's mean absolute value."""
        if len(self.weights) != len(other.weights):
            return False
        pairs = zip(
            self.weights[0::2],
            self.weights[1::2],
            other.weights[0::2],
            other.weights[1::2],
            strict=True,
        )
        for mean_a, abs_a, mean_b, abs_b in pairs:
            scale = tolerance * max(abs_a, abs_b)
            if abs(mean_a - mean_b) > scale or abs(abs_a - abs_b) > scale:
                return False
        return True


_FINGERPRINT_ROWS = 4


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict) -> None:
    """Write a safetensors file so that a crash never leaves a half-written one behind.

    A temporary file is renamed over ``path``; it gets the permissions any new file gets
    (``0666`` less the umask: safetensors alone writes ``0600``, which would make files shared
    through ``$DYMU_THRESHOLDS`` unreadable to others), and is removed if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _check_values(values: torch.Tensor, source: str) -> None:
    bad = torch.isnan(values) | (values < -1)
    if bool(bad.any()):
        block = int(bad.nonzero()[0])
        raise DyMUError(
            f"{source}: threshold of block {block} is {values[block].item()} "
            "(must be a number >= -1; 1 or more means never merge)"
        )


def search_paths() -> list[Path]:
    """Where thresholds are looked up by model name: shipped files, then the user folder."""
    shipped = Path(__file__).resolve().parents[1] / "thresholds"
    user = Path(os.environ.get("DYMU_THRESHOLDS", Path.home() / ".cache" / "dymu" / "thresholds"))
    return [shipped, user]


def find_threshold_file(name: str, pretrained: str | None = None) -> Path | None:
    """The file for a name: ``NAME-PRETRAINED.safetensors`` first, then ``NAME.safetensors``."""
    stems = ([f"{name}-{pretrained}"] if pretrained and not _is_path(pretrained) else []) + [name]
    for folder in search_paths():
        for stem in stems:
            candidate = folder / f"{stem}.safetensors"
            if candidate.is_file():
                return candidate
    return None


def _is_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
