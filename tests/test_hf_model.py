"""``--hf-model``: tiny transformers folders saved with ``save_pretrained``, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import towers
from conftest import interrupt_after, one_thread, run_cli
from PIL import Image

import dymu
from dymu import Thresholds
from dymu.calibration.job import CalibrationConfig, run_calibration
from dymu.cli import encode_main, find_thresholds_main

KINDS = {"clip": "hf CLIP", "siglip": "hf SigLIP", "siglip2": "hf SigLIP2"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved towers, plus a tiny LLaVA whose vision tower is a SigLIP."""
    from transformers import CLIPImageProcessor

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for key, kind in KINDS.items():
        towers.build(kind).save_pretrained(root / key)
        out[key] = root / key
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(
        root / "clip"
    )
    towers.build("hf CLIP", seed=1).save_pretrained(root / "clip-reseeded")
    out["clip-reseeded"] = root / "clip-reseeded"
    out["vlm"], out["vlm-model"] = _llava(root / "vlm")
    return out


def _llava(path: Path):
    from conftest import TINY_LM
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(3)
    vision = towers.build("hf SigLIP").config
    config = LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**TINY_LM), image_token_id=63
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def data(photo_dir):
    return photo_dir / "images.json"


def find_args(data, folder, out, batch_size=4, workers=0) -> list[str]:
    args = [
        "--data",
        data,
        "--hf-model",
        folder,
        "--batch-size",
        batch_size,
        "--num-workers",
        workers,
        "--out",
        out,
    ]
    return [str(a) for a in args]


def run(main, args) -> int:
    return main([str(a) for a in args])


def test_a_vlm_folder_gives_its_vision_tower_only(folders):
    enc = dymu.build_encoder(folders["vlm"])
    expected = folders["vlm-model"].model.vision_tower.state_dict()
    got = enc.tower.module.state_dict()
    assert type(enc.tower.module).__name__ == "SiglipVisionModel"
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_folders_processor_gives_mean_and_std(folders):
    enc = dymu.build_encoder(folders["clip"])
    normalize = enc.preprocess.transforms[-1]
    assert tuple(normalize.mean) == (0.1, 0.2, 0.3) and tuple(normalize.std) == (0.4, 0.5, 0.6)


def test_missing_or_wrong_folders_are_one_line_errors(tmp_path, data, capsys):
    assert run(find_thresholds_main, ["--data", data, "--hf-model", tmp_path]) == 2
    assert "not a transformers model folder (no config.json)" in capsys.readouterr().err
    assert run(find_thresholds_main, ["--data", data, "--hf-model", "x", "--model", "y"]) == 2
    assert "drop --model/--pretrained" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["clip", "siglip"])
def test_find_resume_torchrun_and_encode(key, folders, data, tmp_path, capsys):
    folder = folders[key]
    out = tmp_path / "t.safetensors"
    assert find_thresholds_main(find_args(data, folder, out)) == 0, capsys.readouterr().err
    th = Thresholds.load(out)
    assert th.metadata["tower"] == str(folder) and th.metadata["images"] == "12"
    assert th.count.tolist() == [3] * towers.DEPTH
    assert "prefix tokens" in th.metadata["tower_arch"]

    # interrupted after 3 batches of 2, then resumed: identical to an uninterrupted run
    def config(name, **kw):
        return CalibrationConfig(
            data=str(data), hf_model=str(folder), out=str(tmp_path / name), batch_size=2, **kw
        )

    stop_after_three = interrupt_after(3, [])
    with one_thread():  # as the CLI runs below (OMP_NUM_THREADS=1): float sums in one order
        full = run_calibration(config("full.safetensors"))
        with pytest.raises(KeyboardInterrupt):
            run_calibration(config("r.safetensors", checkpoint_every=1), on_batch=stop_after_three)
        resumed = []
        res = run_calibration(
            config("r.safetensors", resume=True), on_batch=lambda b, t: resumed.append(b.index)
        )
    assert resumed == [3, 4, 5]
    assert torch.equal(res.thresholds.sum, full.thresholds.sum)
    assert torch.equal(res.thresholds.count, full.thresholds.count)

    # two processes under torchrun give the result of one
    common = find_args(data, folder, "", batch_size=2)[:-1]
    run_cli([*common, tmp_path / "one.safetensors"], tmp_path)
    run_cli([*common, tmp_path / "two.safetensors"], tmp_path, nproc=2)
    one, two = (Thresholds.load(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert torch.equal(one.count, two.count) and one.count[0] == 6
    assert torch.allclose(one.sum, two.sum, rtol=0, atol=1e-12)
    assert torch.allclose(one.sum, full.thresholds.sum, rtol=0, atol=1e-12)

    # encode, with a picture of the groups over every patch
    capsys.readouterr()
    images = [data.parent / "img" / "coffee.jpg", data.parent / "img" / "grass.jpg"]
    show = tmp_path / "show"
    args = [*images, "--hf-model", folder, "--thresholds", out, "--show", show]
    code = run(encode_main, args)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    *lines, summary = stdout.strip().splitlines()
    counts = [int(line.split()[1]) for line in lines]
    assert summary.startswith(f"mean {sum(counts) / 2:.1f} tokens over 2 images")
    enc = dymu.load_encoder(folder, thresholds=out)
    with torch.inference_mode():
        expected = [int(enc(enc.preprocess(Image.open(p))[None]).lengths[0]) for p in images]
    assert counts == expected
    with torch.inference_mode():
        groups = enc(enc.preprocess(Image.open(images[0]))[None]).groups[0]
    prefix = enc.tower.num_prefix_tokens  # CLIP's class token is not in the picture
    grid = towers.SIZE // towers.PATCH
    assert_painted_by_groups(Image.open(show / "coffee.dymu.png"), groups[prefix:], grid, grid)


def assert_painted_by_groups(sheet: Image.Image, groups: torch.Tensor, rows: int, cols: int):
    """The right half of a --show picture: every patch painted in its group's one colour."""
    p = towers.PATCH
    assert sheet.size == (2 * cols * p + 8, rows * p + 20)
    pixels = np.asarray(sheet, dtype=np.int64)
    centres = pixels[p // 2 : rows * p : p, cols * p + 8 + p // 2 :: p][:rows, :cols]
    labels = groups.reshape(rows, cols)
    assert len(labels.unique()) > 1
    for slot in labels.unique():
        colours = centres[(labels == slot).numpy()]
        assert (colours == colours[0]).all()


def test_siglip2_encode_paints_its_own_patch_grid(folders, data, tmp_path, capsys):
    folder = folders["siglip2"]
    out = tmp_path / "t.safetensors"
    args = find_args(data, folder, out, workers=1)  # dicts of tensors through a worker
    assert find_thresholds_main(args) == 0, capsys.readouterr().err
    wide = data.parent / "img" / "wide.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(wide)
    args = [wide, "--hf-model", folder, "--thresholds", out, "--show", tmp_path / "show"]
    assert run(encode_main, args) == 0, capsys.readouterr().err
    enc = dymu.load_encoder(folder, thresholds=out)
    inputs = enc.preprocess(Image.open(wide))
    rows, cols = inputs["spatial_shapes"].tolist()
    assert cols > rows and rows * cols <= 64  # a wide grid within the patch budget
    with torch.inference_mode():
        out = enc({k: v[None] for k, v in inputs.items()})
    sheet = Image.open(tmp_path / "show" / "wide.dymu.png")
    assert_painted_by_groups(sheet, out.groups[0, : rows * cols], rows, cols)
    stdout = capsys.readouterr().out
    assert f"{int(out.lengths[0])} tokens" in stdout and "wide.dymu.png" in stdout


def test_thresholds_of_one_tower_are_refused_for_another(folders, data, tmp_path, capsys):
    out = tmp_path / "clip.safetensors"
    assert find_thresholds_main(find_args(data, folders["clip"], out)) == 0
    capsys.readouterr()
    image = data.parent / "img" / "coffee.jpg"
    for other, why in (("siglip", "0 prefix tokens"), ("clip-reseeded", "with weights")):
        code = encode_main(
            [str(image), "--hf-model", str(folders[other]), "--thresholds", str(out)]
        )
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' bar
        assert code == 2 and err.startswith("dymu-encode: error:") and why in err
        assert f"made for {folders['clip']}" in err and f"not for {folders[other]}" in err
    with pytest.raises(dymu.DyMUError, match=f"not for {folders['siglip']}"):
        dymu.load_encoder(folders["siglip"], thresholds=out)


def test_the_job_and_find_thresholds_share_one_core(folders, data, tmp_path):
    """The CLI job on any encoder gives what dymu.find_thresholds gives on the same batches,
    with the same metadata."""
    from dymu.sources.stream import load_rgb, open_source, stack_inputs

    enc = dymu.build_encoder(towers.build("hf ViT"))
    job = run_calibration(
        CalibrationConfig(data=str(data), out=str(tmp_path / "t.safetensors"), batch_size=4),
        encoder=enc,
    ).thresholds
    items = [enc.preprocess(load_rgb(p)) for p in open_source(str(data)).paths]
    batches = [stack_inputs(items[i : i + 4]) for i in range(0, len(items), 4)]
    direct = dymu.find_thresholds(enc, batches)
    assert torch.equal(job.count, direct.count)
    assert torch.allclose(job.sum, direct.sum, rtol=0, atol=1e-12)
    job_only = {"covers", "calibration_tokens_mean"} | {
        k for k in job.metadata if k.startswith("inference_")
    }  # what the job adds: the data it covered, token counts
    assert job_only <= set(job.metadata)
    skip = {"created"} | job_only
    assert {k: v for k, v in job.metadata.items() if k not in skip} == {
        k: v for k, v in direct.metadata.items() if k not in skip
    }
    assert direct.metadata["tower"] == "ViTModel" and direct.metadata["dtype"] == "fp32"
