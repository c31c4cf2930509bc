"""Shared fixtures: a tiny open_clip config (64x64 images, 8x8 patches, 65 tokens, 4 blocks)
and real photos from scikit-image's bundled data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import towers  # noqa: E402,F401  (registers the tiny timm trunks the configs name)
from PIL import Image

from dymu.lm.vtu_attention import forward_cache_argument

TINY = "ViT-T-8-test"
CONFIGS = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIGS)

# a tiny Llama-shaped language model (vocab 64, hidden 32, 2 layers, GQA 4/2 heads)
TINY_LM = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "brick",
    "grass",
    "coins",
    "hubble_deep_field",
    "retina",
    "gravel",
    "moon",
]


def cache_of(output) -> object:
    """The KV cache a model output carries: ``cache`` in the newest transformers releases,
    which keep ``past_key_values`` as a deprecated alias, the only name in older ones."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes the KV cache: ``cache`` in the newest
    transformers releases (which deprecate ``past_key_values``), ``past_key_values`` before."""
    return forward_cache_argument(model.forward)


def photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(np.asarray(getattr(data, name)()))


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    return [photo(n) for n in PHOTOS]


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, photos) -> Path:
    """Real photos as JPEG files plus an ``images.json`` listing them."""
    import json

    root = tmp_path_factory.mktemp("photos")
    (root / "img").mkdir()
    entries = []
    for name, img in zip(PHOTOS, photos, strict=True):
        img.save(root / "img" / f"{name}.jpg")
        entries.append({"image": f"img/{name}.jpg", "caption": name})
    (root / "images.json").write_text(json.dumps(entries))
    return root


def checkerboard(size: int = 64, cell: int = 8) -> Image.Image:
    idx = np.arange(size) // cell
    board = ((idx[:, None] + idx[None, :]) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board] * 3, -1))


def noise(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@contextmanager
def one_thread():
    """Torch on one CPU thread, as :func:`run_cli`'s subprocesses run: a product's partial sums
    then add up in the same order in both, which some torch releases (2.11) change with the
    thread count by a float32 rounding step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_cli(args, tmp_path, nproc=1):
    """``dymu-find-thresholds ARGS`` in a subprocess (``nproc`` > 1: under torchrun)."""
    exe = shutil.which("dymu-find-thresholds")
    if nproc == 1:
        cmd = [exe]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # torchrun picks a free port
            "--nproc_per_node",
            str(nproc),
            exe,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + [str(a) for a in args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    # each rank's own error comes first in stderr, torchrun's summary last
    assert proc.returncode == 0, proc.stderr[:6000]
    return proc


def interrupt_after(count: int, seen: list[int]):
    """An ``on_batch`` callback that records batch numbers and presses Ctrl-C after ``count``."""

    def on_batch(batch, tokens) -> None:
        seen.append(batch.index)
        if len(seen) == count:
            raise KeyboardInterrupt

    return on_batch
