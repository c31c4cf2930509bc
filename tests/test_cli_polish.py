"""The command line as people use it: help that reads once, lazy imports, advice that fits the
interface, and the inference token count recorded beside the calibration one."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from PIL import Image

import dymu
from dymu import Thresholds, load_encoder
from dymu.cli import encode_main, find_thresholds_main
from dymu.cli.find import convert_parser, find_thresholds_parser, merge_parser

MODEL = f"{TINY}-tome-24out"


def help_texts() -> dict[str, str]:
    from dymu.cli.encode import encode_parser

    parsers = [find_thresholds_parser(), merge_parser(), convert_parser(), encode_parser()]
    return {p.prog: p.format_help() for p in parsers}


def test_help_states_each_default_once_and_lists_the_subcommands():
    for prog, text in help_texts().items():
        options = re.split(r"\n  (?=-)", text)  # one chunk per option
        for option in options:
            assert option.count("(default") <= 1, f"{prog}: {option}"
            assert "(default: None)" not in option and "(default: False)" not in option
    find = help_texts()["dymu-find-thresholds"]
    usage = find.split("\n\n")[0]
    assert "dymu-find-thresholds merge PART" in usage and "dymu-find-thresholds convert" in usage
    assert "examples:" in find and "torchrun" in find
    assert "(default: 32)" in find  # a default the text does not say is still shown


def test_find_help_groups_its_options_under_headings():
    find = help_texts()["dymu-find-thresholds"]
    parts = re.split(r"\n(images|model and merging|running|output and resuming):\n", find)
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))  # heading -> its options
    assert list(sections) == ["images", "model and merging", "running", "output and resuming"]
    placed = {"images": "--data --max-pixels", "model and merging": "--model --hf-model",
              "running": "--device", "output and resuming": "--out --resume"}  # fmt: skip
    for heading, flags in placed.items():
        for flag in flags.split():
            assert re.search(rf"^  {flag} ", sections[heading], re.M), (heading, flag)


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        find_thresholds_main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip().endswith(dymu.__version__)


def test_help_and_option_errors_import_neither_torch_nor_the_model_libraries():
    """What --help and a bad option cost: the parser's own imports only."""
    code = (
        "import sys\n"
        "from dymu.cli import encode_main, find_thresholds_main\n"
        "assert find_thresholds_main(['--data', 'x', '--max-images', '0']) == 2\n"
        "assert encode_main(['a.jpg', '--r-total', 'many']) == 2\n"
        "assert find_thresholds_main(['merge']) == 2\n"
        "heavy = [m for m in ('torch', 'open_clip', 'transformers', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all(": error: " in line for line in lines)


def test_missing_thresholds_advice_fits_each_interface(photo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DYMU_THRESHOLDS", str(tmp_path))  # nothing to find there
    image = photo_dir / "img" / "coffee.jpg"
    code = encode_main([str(image), "--model", MODEL, "--pretrained", "none"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "pass --thresholds FILE" in line and "--r-total 0" in line
    assert "thresholds=FILE" not in line and "r_total=0" not in line
    with pytest.raises(dymu.DyMUError) as python:
        load_encoder(MODEL, "none")
    assert "thresholds=FILE" in str(python.value) and "--thresholds" not in str(python.value)
    assert f"dymu-find-thresholds --model {MODEL}" in str(python.value)


def test_missing_thresholds_advice_in_a_llava_config(monkeypatch, tmp_path):
    from test_llava import build  # the original LLaVA (llava-torch), as .ci/run installs

    from dymu.integrations import llava as dymu_llava

    monkeypatch.setenv("DYMU_THRESHOLDS", str(tmp_path))
    dymu_llava.enable()
    try:
        with pytest.raises(dymu.DyMUError) as err:
            build(None)
    finally:
        dymu_llava.disable()
    assert '"dymu_thresholds": FILE' in str(err.value) and "thresholds=FILE" not in str(err.value)


def test_encode_r_total_zero_needs_no_thresholds(photo_dir, capsys):
    image = photo_dir / "img" / "coffee.jpg"
    code = encode_main([str(image), "--model", MODEL, "--pretrained", "none", "--r-total", "0"])
    out = capsys.readouterr().out
    assert code == 0 and out.split()[1] == "65"  # every patch and the class token


def test_inference_token_count_is_what_encoding_keeps(photo_dir, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    args = ["--data", photo_dir / "images.json", "--model", MODEL, "--pretrained", "none"]
    args += ["--batch-size", "4", "--num-workers", "0", "--out", out, "--inference-sample", "5"]
    assert find_thresholds_main([str(a) for a in args]) == 0
    stdout = capsys.readouterr().out
    meta = Thresholds.load(out).metadata
    encoder = load_encoder(MODEL, "none", thresholds=out)
    first = [photo_dir / e for e in ("img/astronaut.jpg", "img/coffee.jpg", "img/chelsea.jpg")]
    first += [photo_dir / "img/rocket.jpg", photo_dir / "img/camera.jpg"]
    with torch.inference_mode():
        counts = torch.tensor(
            [float(encoder(encoder.preprocess(Image.open(p).convert("RGB"))[None]).lengths[0])
             for p in first]
        )  # fmt: skip
    assert meta["inference_images"] == "5"
    assert meta["inference_tokens_mean"] == f"{counts.mean().item():.2f}"
    assert meta["inference_tokens_std"] == f"{counts.std(unbiased=False).item():.2f}"
    assert (meta["inference_tokens_min"], meta["inference_tokens_max"]) == (
        str(int(counts.min())),
        str(int(counts.max())),
    )
    assert f"(inference, first 5 images): mean {meta['inference_tokens_mean']}" in stdout
    assert f"mean {float(meta['calibration_tokens_mean']):.1f}" in stdout  # the batch rule's
