"""``repr`` of encoders (the wrapped model once, plus a summary line) and of their outputs."""

from __future__ import annotations

import pytest
import torch
import towers
from conftest import TINY

import dymu
from dymu import EncoderOutput, Thresholds

NAME = f"{TINY}-tome-24out"
KINDS = ["open_clip ViT", *towers.BUILDERS]


def encoder_and_model(kind: str) -> tuple[dymu.DyMUEncoder, torch.nn.Module]:
    if kind == "open_clip ViT":
        enc = dymu.build_encoder(NAME)
        return enc, enc.tower.module
    model = towers.build(kind)
    return dymu.build_encoder(model), model


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_repr_lists_the_model_once(kind):
    enc, model = encoder_and_model(kind)
    text, model_text = repr(enc), repr(model)
    assert text.count(model_text.replace("\n", "\n    ")) == 1  # indented under (tower)
    block = type(enc.tower.blocks[0]).__name__ + "("
    assert text.count(block) == model_text.count(block) > 0
    summary = text.splitlines()[1]
    for part in (f"name={enc.name!r}", "blocks=4", f"r_total={sum(enc.r)}", "thresholds=None"):
        assert part in summary
    assert summary.endswith("select_layer=None, drop_cls=False")


@pytest.mark.parametrize("kind", KINDS)
def test_repr_leaves_state_dict_and_parameters_alone(kind):
    """The adapters' shortcuts (``blocks``, ``core``, ``trunk``) stay registered: every
    registered child's keys are still in the state dict, and the parameters are the model's."""
    enc, model = encoder_and_model(kind)
    keys = set(enc.state_dict())
    expected = {
        f"tower.{name}.{key}"
        for name, child in enc.tower._modules.items()
        for key in child.state_dict()
    }
    assert keys == expected
    assert {f"tower.blocks.{k}" for k in enc.tower.blocks.state_dict()} <= keys
    assert len(keys) > len(model.state_dict())  # the shortcuts' keys are kept
    assert [id(p) for p in enc.parameters()] == [id(p) for p in model.parameters()]


def test_summary_line_follows_the_options():
    enc = dymu.build_encoder(NAME, select_layer=-2, drop_cls=True, fixed_r=True)
    summary = repr(enc).splitlines()[1]
    assert "blocks=3 of 4" in summary and "merging=fixed r" in summary
    assert summary.endswith("select_layer=-2, drop_cls=True")
    enc = dymu.build_encoder(NAME, schedule=[0, 4, 4, 4])
    enc.set_thresholds(Thresholds.from_values(torch.tensor([0.5, 0.9, 1.0, 0.8]), enc.r))
    summary = repr(enc).splitlines()[1]
    assert "r_total=12 (explicit:0,4,4,4)" in summary
    assert "thresholds=2 merging blocks" in summary  # block 0: r=0, block 2: threshold 1
    assert "merging=off" in repr(dymu.build_encoder(NAME, r_total=0))


def output(batch: int, pooled: bool = True) -> EncoderOutput:
    lengths = torch.arange(batch) + 10
    return EncoderOutput(
        tokens=torch.randn(batch, 65, 64),
        lengths=lengths,
        sizes=torch.ones(batch, 65),
        groups=torch.zeros(batch, 64, dtype=torch.long),
        pooled=torch.randn(batch, 32, dtype=torch.float16) if pooled else None,
        block_lengths=lengths[:, None].expand(batch, 4),
    )


def test_encoder_output_repr_shows_shapes_not_values():
    assert repr(output(2)) == (
        "EncoderOutput(tokens=(2, 65, 64) float32, lengths=[10, 11], sizes=(2, 65) float32, "
        "groups=(2, 64) int64, pooled=(2, 32) float16, block_lengths=(2, 4) int64)"
    )
    many = repr(output(12, pooled=False))
    assert "lengths=[10, 11, 12, 13, 14, 15, 16, 17, ...]," in many
    assert "pooled=None" in many and "tensor(" not in many


def test_encoder_output_repr_of_a_real_output():
    enc = dymu.build_encoder(NAME, r_total=0)
    with torch.no_grad():
        out = enc(torch.randn(3, 3, 64, 64))
    assert repr(out).startswith("EncoderOutput(tokens=(3, 65, 64) float32, lengths=[65, 65, 65],")
