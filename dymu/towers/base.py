"""The tower interface: what the encoder's block loop needs from a vision tower.

An adapter reads one tower family's own modules (open_clip, timm, transformers), never a copy
of their code, and sees the tower as pre-norm residual blocks:
``x = x + attn_out(attend(qkv(x))); [merge]; x = x + mlp(x)``. ``supports`` says whether a
module is one the adapter serves; the registry in ``towers/__init__.py`` asks each adapter
in turn.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

# What a tower takes: a pixel tensor ``(B, 3, H, W)``, or a dict of tensors for towers whose
# processor gives more (SigLIP2: patches, their mask and the patch grid of every image).
Inputs = torch.Tensor | Mapping[str, torch.Tensor]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


class TowerAdapter(nn.Module, metaclass=ABCMeta):
    """A tower seen block by block. Subclasses hold the tower as a submodule, so
    ``.to()``/``.half()`` and ``state_dict`` act on the original weights.

    Instance attributes every adapter sets: ``num_blocks``, ``num_heads``, ``width`` and
    ``mlp_width`` (for FLOP counts), ``patch_size``, ``num_prefix_tokens`` (class, register,
    distillation tokens before the patches) and ``num_tokens`` (tokens entering the first
    block at the tower's default image size, prefix tokens included).
    """

    family: ClassVar[str]  # how errors and listings name the towers this adapter serves
    # default preprocessing for instances that come without one (see ``preprocess``)
    image_mean: ClassVar[tuple[float, ...]] = OPENAI_CLIP_MEAN
    image_std: ClassVar[tuple[float, ...]] = OPENAI_CLIP_STD
    resize_mode: ClassVar[str] = "shortest"  # open_clip's modes: shortest (+ crop), squash
    interpolation: ClassVar[str] = "bicubic"

    num_blocks: int
    num_heads: int
    width: int
    mlp_width: int
    patch_size: int
    num_prefix_tokens: int
    num_tokens: int
    image_size: tuple[int, int]

    @classmethod
    @abstractmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether ``module`` is a tower this adapter serves (the registry asks this)."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The tower as it was given (its own forward is the unmodified model)."""

    @property
    @abstractmethod
    def patch_weight(self) -> torch.Tensor:
        """The patch-embedding weight, ``(width, ...)``: what a weights fingerprint reads."""

    @abstractmethod
    def embed(self, inputs: Inputs) -> torch.Tensor:
        """Patch, prefix and position embeddings (and any pre-norm): ``(B, N0, D)``."""

    def input_lengths(self, inputs: Inputs) -> torch.Tensor | None:
        """Real tokens per image when the input is a padded batch (``None``: all real)."""
        return None

    @abstractmethod
    def qkv(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-norm and in-projection of ``x``: q, k, v each ``(T, D)``, bias included."""

    @abstractmethod
    def attn_out(self, block: int, out: torch.Tensor) -> torch.Tensor:
        """Output projection (and layer scale) of the attention result ``(T, D)``."""

    @abstractmethod
    def mlp(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch of the block (norm, MLP, layer scale), without the residual."""

    @abstractmethod
    def pool(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        """The tower's image embedding from its final padded tokens ``(B, L, D)`` and their
        sizes ``(B, L)`` (0 on padding); ``None`` if the tower has no head."""

    def sized_heads(
        self, sizes: Callable[[], torch.Tensor | None]
    ) -> list[tuple[Any, str, Callable]]:
        """Instance patches that let the tower's own pooling see merged tokens with their
        sizes, for :func:`dymu.apply_tome`: ``(object, method name, function)``,
        each function taking the object first. ``sizes()`` gives the last forward's padded
        sizes ``(B, L)`` (0 on padding), ``None`` while nothing merged. Class-token heads need
        none; a head that cannot take sizes raises :class:`DyMUError`."""
        return []

    def __repr__(self) -> str:
        """The wrapped model once: submodules an adapter keeps as shortcuts into it
        (``blocks``, ``core``, ``trunk``) stay registered, so ``state_dict`` keeps their
        keys, but are not listed again."""
        children = list(self._modules.items())
        modules = [child for _, child in children]
        lines = [self.extra_repr()] if self.extra_repr() else []
        for i, (name, child) in enumerate(children):
            if child is not None and not _is_shortcut(i, modules):
                lines.append(f"({name}): " + repr(child).replace("\n", "\n  "))
        if not lines:
            return f"{self._get_name()}()"
        return f"{self._get_name()}(\n  " + "\n  ".join(lines) + "\n)"

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix_tokens

    def architecture(self) -> str:
        """Family-neutral shape: the same tower read by two libraries gives the same string."""
        return (
            f"{self.num_blocks} blocks, width {self.width}, {self.num_heads} heads, "
            f"{self.num_patches} patches of {self.patch_size}px, "
            f"{self.num_prefix_tokens} prefix tokens"
        )

    def patch_grid(self, inputs: Inputs, index: int) -> tuple[int, int]:
        """Patch rows and columns of image ``index`` (for pictures of the merged groups)."""
        height, width = inputs.shape[-2:]
        return height // self.patch_size, width // self.patch_size

    def image_tensor(self, inputs: Inputs, index: int) -> torch.Tensor:
        """Image ``index`` as the normalised ``(3, H, W)`` pixels the tower saw."""
        return inputs[index]

    def preprocess(
        self, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
    ) -> Callable[[Any], Inputs]:
        """PIL image -> the tower's input, for towers that come without a transform: the
        family's resize at the tower's image size, then normalisation."""
        from open_clip import image_transform

        return image_transform(
            self.image_size,
            is_train=False,
            mean=mean or self.image_mean,
            std=std or self.image_std,
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
        )


def _is_shortcut(index: int, modules: Sequence[nn.Module | None]) -> bool:
    """Whether child ``index`` repeats an earlier child or lies inside another child."""
    child = modules[index]
    if any(m is child for m in modules[:index]):
        return True
    return any(
        other is not None and other is not child and any(m is child for m in other.modules())
        for other in modules
    )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(T, D)`` -> ``(T, heads, D // heads)``."""
    return x.view(*x.shape[:-1], heads, x.shape[-1] // heads)


def size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log(size)`` of every key as an additive attention bias ``(B, 1, 1, L)``; padding
    (size 0) becomes -inf. Proportional attention for pooling heads."""
    return sizes.log().to(dtype)[:, None, None, :]


def weighted_mean(tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Size-weighted mean over tokens ``(B, L, D)``: the mean over the original patches."""
    weights = sizes / sizes.sum(-1, keepdim=True)
    return (tokens * weights[..., None].to(tokens.dtype)).sum(1)


def pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
