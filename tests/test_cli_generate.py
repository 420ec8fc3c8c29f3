"""`sdport generate`: PNGs with their settings, no overwrite without --overwrite, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdport.cli import EXIT_USAGE, main


def generate(model: Path, *extra: str) -> int:
    return main(["generate", str(model), "a red fox", "--steps", "2", *extra])


def test_generate_writes_pngs_with_parameters(tiny_onnx_dir, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert generate(tiny_onnx_dir, "--negative", "blurry", "--seed", "5", "--num-images", "2", "-o", str(out)) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("cpu: ") and "s each" in summary and str(tmp_path / "fox-1.png") in summary
    for i in range(2):
        with Image.open(tmp_path / f"fox-{i}.png") as image:
            assert image.size == (64, 64)
            assert image.text["parameters"] == (
                "a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: pndm, CFG scale: 7.5, "
                f"Seed: {5 + i}, Size: 64x64, Model: onnx, Software: sdport"
            )
    # Image 1 of seed 5 is image 0 of seed 6, up to a level here and there: with 2 or more
    # threads onnxruntime's results differ in the last bit between batch sizes (1e-6 of the
    # UNet's range on the tiny model), and the UNet's guided prefix runs on 2 images, then on 1.
    # Another seed's image differs everywhere, by up to the whole range.
    assert generate(tiny_onnx_dir, "--negative", "blurry", "--seed", "6", "-q", "-o", str(tmp_path / "six.png")) == 0
    with Image.open(tmp_path / "fox-1.png") as a, Image.open(tmp_path / "six.png") as b:
        difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert difference.max() <= 2 and difference.mean() < 0.01, (difference.max(), difference.mean())


def test_several_prompts_make_one_batch_with_each_images_own_prompt_and_seed(tiny_onnx_dir, tmp_path):
    out = tmp_path / "pair.png"
    assert main(["generate", str(tiny_onnx_dir), "a red fox", "a blue bird", "--steps", "2", "--num-images", "2",
                 "--seed", "3", "-q", "-o", str(out)]) == 0
    recorded = []
    for i in range(4):
        with Image.open(tmp_path / f"pair-{i}.png") as image:
            prompt, settings = image.text["parameters"].split("\n")
            recorded.append((prompt, int(re.search(r"Seed: (\d+),", settings)[1])))
    assert recorded == [("a red fox", 3), ("a red fox", 4), ("a blue bird", 5), ("a blue bird", 6)]
    assert not (tmp_path / "pair-4.png").exists()


def test_torch_noise_is_the_apis_and_recorded(tiny_onnx_dir, tmp_path):
    from sdport.runtime import Pipeline

    out = tmp_path / "torch.png"
    assert generate(tiny_onnx_dir, "-q", "--noise", "torch", "--seed", "4", "--scheduler", "euler_ancestral",
                    "-o", str(out)) == 0
    expected = Pipeline.load(tiny_onnx_dir).generate("a red fox", steps=2, seed=4, scheduler="euler_ancestral",
                                                      noise="torch", progress=False)[0]
    with Image.open(out) as image:
        assert image.text["parameters"].endswith("Seed: 4, Size: 64x64, Model: onnx, Noise: torch, Software: sdport")
        assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert generate(tiny_onnx_dir, "-q", "--seed", "4", "-o", str(tmp_path / "portable.png")) == 0
    with Image.open(tmp_path / "portable.png") as image:
        assert "Noise" not in image.text["parameters"]


def test_seed_minus_one_is_a_random_seed_said_and_recorded(tiny_onnx_dir, tmp_path, capsys):
    seeds = []
    for name in ("a.png", "b.png"):
        assert generate(tiny_onnx_dir, "--seed", "-1", "-o", str(tmp_path / name)) == 0
        said = re.search(r"seed: (\d+) \(random\)", capsys.readouterr().err)
        with Image.open(tmp_path / name) as image:
            assert f"Seed: {said[1]}," in image.text["parameters"]
        seeds.append(int(said[1]))
    assert seeds[0] != seeds[1]
    assert generate(tiny_onnx_dir, "-q", "--seed", "-2", "-o", str(tmp_path / "c.png")) == EXIT_USAGE
    assert "seed must be a non-negative integer, got -2" in capsys.readouterr().err


def test_eta_guidance_rescale_and_clip_skip_are_recorded(tiny_onnx_dir, tmp_path):
    out = tmp_path / "settings.png"
    assert generate(tiny_onnx_dir, "-q", "--scheduler", "ddim", "--eta", "0.5", "--guidance-rescale", "0.7",
                    "--clip-skip", "1", "-o", str(out)) == 0
    with Image.open(out) as image:
        assert image.text["parameters"].endswith(
            "Eta DDIM: 0.5, Guidance rescale: 0.7, Clip skip: 2, Software: sdport"  # AUTOMATIC1111 counts it from 1
        )


def test_no_overwrite_without_flag(tiny_onnx_dir, tmp_path, capsys):
    out = tmp_path / "fox.png"
    out.write_bytes(b"keep me")
    assert generate(tiny_onnx_dir, "-q", "-o", str(out)) == EXIT_USAGE
    assert out.read_bytes() == b"keep me"
    assert "already exists" in capsys.readouterr().err
    assert generate(tiny_onnx_dir, "-q", "-o", str(out), "--overwrite", "--scheduler", "euler_ancestral") == 0
    with Image.open(out) as image:
        assert "Sampler: euler_ancestral" in image.text["parameters"]


def test_image_to_image(tiny_onnx_dir, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGBA", (70, 50), (200, 30, 30, 255)).save(source)
    out = tmp_path / "out.png"
    assert generate(tiny_onnx_dir, "-q", "--image", str(source), "--strength", "0.5", "-o", str(out)) == 0
    with Image.open(out) as image:
        assert image.size == (64, 48)  # rounded down to a multiple of 16
        assert "Denoising strength: 0.5" in image.text["parameters"]


def test_strength_without_image_is_named_and_ignored(tiny_onnx_dir, tmp_path, caplog):
    assert generate(tiny_onnx_dir, "-q", "--strength", "0.3", "-o", str(tmp_path / "a.png")) == 0
    assert "--strength applies to image-to-image only (with --image): ignored" in caplog.text
    caplog.clear()
    assert generate(tiny_onnx_dir, "-q", "-o", str(tmp_path / "b.png")) == 0
    assert caplog.text == ""
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.text == b.text and "strength" not in a.text["parameters"]
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "100"], "width 100 is not a multiple of 16"),
        (["--scheduler", "k_lms"], "unknown scheduler 'k_lms'; choose one of: ddim, "),
        (["--provider", "tpu"], "unknown provider 'tpu'; choose auto, cuda, dml, cpu (installed here: "),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--image", "missing.png"], "input image missing.png not found"),
    ],
)
def test_errors_are_one_line_and_exit_2(tiny_onnx_dir, tmp_path, capsys, args, message):
    assert generate(tiny_onnx_dir, "-q", "-o", str(tmp_path / "x.png"), *args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sdport: error: ") and message in err
    assert not (tmp_path / "x.png").exists()


def test_missing_model_folder(tmp_path, capsys):
    assert generate(tmp_path / "nope", "-q") == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model folder not found" in err
