"""The console scripts end to end on real photos, and every bad input's exit code and message."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import TINY, checkerboard
from PIL import Image

from dymu import Thresholds, load_encoder, resolve_name
from dymu.cli import encode_main, find_thresholds_main

MODEL = f"{TINY}-tome-24out"


def run(main, args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def mixed_dir(photo_dir, tmp_path_factory):
    """The photos plus a grayscale, an RGBA and a palette-with-transparency image."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(photo_dir / "img", root / "img")
    entries = json.loads((photo_dir / "images.json").read_text())
    rgb = np.asarray(checkerboard())
    Image.fromarray(rgb[..., 0]).save(root / "img" / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(
        root / "img" / "rgba.png"
    )
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "img" / "palette.png", transparency=0)
    entries += [{"image": f"img/{n}.png"} for n in ("gray", "rgba", "palette")]
    (root / "images.json").write_text(json.dumps(entries))
    return root


def calibrate_args(data, out, workers: int) -> list[str]:
    return [
        "--data",
        str(data),
        "--model",
        MODEL,
        "--pretrained",
        "none",
        "--batch-size",
        "5",
        "--num-workers",
        str(workers),
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def thresholds_file(mixed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("th") / "t.safetensors"
    assert find_thresholds_main(calibrate_args(mixed_dir / "images.json", out, 0)) == 0
    return out


def test_find_thresholds_end_to_end(mixed_dir, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code, stdout, err = run(
        find_thresholds_main, calibrate_args(mixed_dir / "images.json", out, 1), capsys
    )
    assert code == 0, err
    th = Thresholds.load(out)
    assert th.metadata["model"] == MODEL and th.metadata["images"] == "15"
    assert th.metadata["pretrained"] == "none" and th.metadata["batch_size"] == "5"
    assert th.count.tolist() == [3, 3, 3, 3]  # 15 images in batches of 5
    assert th.r.sum().item() == resolve_name(MODEL).r_total == 40
    assert "threshold" in stdout and "mean" in stdout and "wrote" in stdout
    assert "calibrating" in err  # the progress bar


def test_encode_prints_counts(mixed_dir, thresholds_file, capsys):
    images = [mixed_dir / "img" / "coffee.jpg", mixed_dir / "img" / "gray.png"]
    code, out, err = run(
        encode_main,
        [*images, "--model", MODEL, "--thresholds", thresholds_file, "--per-block"],
        capsys,
    )
    assert code == 0, err
    *lines, summary = out.strip().splitlines()
    assert len(lines) == 2 and all("tokens" in line and "per block" in line for line in lines)
    per_block = [int(v) for v in lines[0].split("per block:")[1].split()]
    assert len(per_block) == 4 and per_block == sorted(per_block, reverse=True)
    assert int(lines[0].split()[1]) == per_block[-1]
    counts = [int(line.split()[1]) for line in lines]
    meta = Thresholds.load(thresholds_file).metadata
    assert summary.startswith(f"mean {sum(counts) / 2:.1f} tokens over 2 images (the thresholds")
    assert f"kept {meta['inference_tokens_mean']} on average" in summary


def test_encode_shows_merged_groups(mixed_dir, thresholds_file, tmp_path, capsys):
    image = mixed_dir / "img" / "coffee.jpg"
    args = [image, "--model", MODEL, "--thresholds", thresholds_file, "--show", tmp_path / "show"]
    code, out, err = run(encode_main, args, capsys)
    assert code == 0, err
    picture = tmp_path / "show" / "coffee.dymu.png"
    assert str(picture) in out
    sheet = np.asarray(Image.open(picture), dtype=np.int64)
    assert sheet.shape == (64 + 20, 2 * 64 + 8, 3)
    encoder = load_encoder(MODEL, "none", thresholds=thresholds_file)
    with torch.inference_mode():
        groups = encoder(encoder.preprocess(Image.open(image).convert("RGB"))[None]).groups[0]
    patch_groups = groups[1:].reshape(8, 8)
    centres = sheet[4:64:8, 64 + 8 + 4 :: 8]  # the centre pixel of every patch, right half
    for slot in patch_groups.unique():
        colours = centres[(patch_groups == slot).numpy()]
        assert (colours == colours[0]).all()  # one group, one colour
    assert int(out.split()[1]) == len(groups.unique())  # tokens printed = slots in the picture


def test_console_script_installed(mixed_dir, tmp_path):
    exe = shutil.which("dymu-find-thresholds")
    assert exe is not None
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--r-total" in proc.stdout


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"image": ', "is not valid JSON"),
        ('{"image": "a.jpg"}', "must hold a JSON list"),
        ("[]", "lists no images"),
        ('[{"path": "a.jpg"}]', 'entry 0 has no "image" path'),
        ('[{"image": "missing.jpg"}]', "no usable images"),
    ],
)
def test_bad_data_files(tmp_path, capsys, content, message):
    data = write(tmp_path, "d.json", content)
    code, _, err = run(
        find_thresholds_main, ["--data", data, "--model", MODEL, "--pretrained", "none"], capsys
    )
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # one line, after any progress bar
    assert last.startswith("dymu-find-thresholds: error:") and message in last


def test_undecodable_image_is_skipped_or_fatal_with_strict(tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    data = write(tmp_path, "d.json", json.dumps([{"image": "bad.jpg"}]))
    args = ["--data", data, "--model", MODEL, "--pretrained", "none", "--num-workers", "1"]
    code, _, err = run(find_thresholds_main, args, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "no usable images" in last and "bad.jpg: not an image" in last
    code, _, err = run(find_thresholds_main, [*args, "--strict"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "bad image" in last and "bad.jpg" in last and "Traceback" not in err


@pytest.mark.parametrize(
    "model,message",
    [
        ("ViT-B-16", "dymu names look like"),
        ("ViT-Nope-tome", "not an open_clip model"),
        (f"{TINY}-tome-999out", "keeps 999 tokens"),
    ],
)
def test_unknown_model(photo_dir, capsys, model, message):
    code, _, err = run(
        find_thresholds_main,
        ["--data", photo_dir / "images.json", "--model", model, "--pretrained", "none"],
        capsys,
    )
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--r-total", "500"], "r_total 500 would keep -436 of the 64 patches"),
        (["--r-total", "-1"], "argument --r-total: must be at least 0, got -1"),
        (["--max-images", "0"], "argument --max-images: must be at least 1, got 0"),
        (["--max-images", "-3"], "argument --max-images: must be at least 1"),
        (["--num-workers", "-1"], "argument --num-workers: must be at least 0, got -1"),
        (["--batch-size", "x"], "argument --batch-size: 'x' is not a whole number"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    ],
)
def test_out_of_range_options_are_refused_in_one_line(photo_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "t.safetensors"
    args = ["--data", photo_dir / "images.json", "--model", f"{TINY}-tome", "--pretrained", "none"]
    code, _, err = run(find_thresholds_main, [*args, "--out", out, *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and message in lines[-1] and "Traceback" not in err
    assert not out.exists() and "calibrating" not in err


def test_unavailable_weights(photo_dir, capsys):
    code, _, err = run(
        find_thresholds_main,
        ["--data", photo_dir / "images.json", "--model", MODEL, "--pretrained", "no-such-tag"],
        capsys,
    )
    assert code == 2 and "cannot load weights 'no-such-tag'" in err


def test_thresholds_for_another_model(photo_dir, thresholds_file, capsys):
    image = photo_dir / "img" / "coffee.jpg"
    code, _, err = run(
        encode_main,
        [
            image,
            "--model",
            "ViT-B-32-tome",
            "--pretrained",
            "none",
            "--thresholds",
            thresholds_file,
        ],
        capsys,
    )
    assert code == 2 and "has 4 blocks but ViT-B-32-tome has 12" in err


def test_thresholds_with_bad_values(photo_dir, thresholds_file, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(thresholds_file))
    tensors["thresholds"] = torch.tensor([0.5, float("nan"), 0.5, 0.5])
    tensors["count"] = torch.zeros(4, dtype=torch.int64)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"format": "dymu-thresholds/1", "model": MODEL})
    code, _, err = run(
        encode_main,
        [photo_dir / "img" / "coffee.jpg", "--model", MODEL, "--thresholds", bad],
        capsys,
    )
    assert code == 2 and "threshold of block 1 is nan" in err


def test_names_resolve():
    spec = resolve_name("ViT-L-14-336-tome")
    assert (spec.num_patches, spec.r_total, spec.schedule, spec.num_blocks) == (
        576,
        384,
        "constant",
        24,
    )
    spec = resolve_name("ViT-L-14-336-tome-72out-reverse-linear")
    assert (spec.base, spec.r_total, spec.schedule) == ("ViT-L-14-336", 504, "reverse_linear")
