"""Image conversion matches diffusers' VaeImageProcessor; PNGs keep their settings and never clobber."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from sdport.errors import UsageError
from sdport.runtime import images as imgs


def photo(width: int = 70, height: int = 50, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


def test_preprocess_and_postprocess_match_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8)
    for image, (width, height) in [(photo(70, 50), (64, 48)), (photo(64, 48), (64, 48))]:  # resize, none
        theirs = processor.preprocess(image, height=height, width=width).numpy()
        ours = imgs.preprocess(image, width, height)
        assert ours.shape == (1, 3, height, width) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-6)

    decoded = np.random.default_rng(1).normal(0, 0.8, (2, 3, 16, 24)).astype(np.float32)
    theirs = processor.postprocess(torch.from_numpy(decoded), output_type="np")
    ours = imgs.postprocess(decoded)
    np.testing.assert_array_equal(ours, theirs)
    for a, b in zip(imgs.to_pil(ours), processor.numpy_to_pil(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_load_image_converts_to_rgb_and_says_so(mode, tmp_path):
    notes = []
    path = tmp_path / f"in.{'jpg' if mode == 'CMYK' else 'png'}"
    photo(mode=mode).save(path)
    image = imgs.load_image(path, notes.append)
    assert image.mode == "RGB" and image.size == (70, 50)
    assert len(notes) == 1 and f"mode {mode} converted to RGB" in notes[0]


def test_load_image_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        imgs.load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UsageError, match="not an image"):
        imgs.load_image(tmp_path / "junk.png")


def test_png_parameters_and_no_clobber(tmp_path):
    text = imgs.parameters_text(
        prompt="a fox", negative_prompt="blurry", steps=25, sampler="euler_ancestral", guidance=7.5,
        seed=3, width=512, height=512, model="sd15",
    )
    assert text == (
        "a fox\nNegative prompt: blurry\nSteps: 25, Sampler: euler_ancestral, CFG scale: 7.5, Seed: 3, "
        "Size: 512x512, Model: sd15, Software: sdport"
    )
    path = tmp_path / "out.png"
    imgs.save_png(photo(), path, text)
    with Image.open(path) as image:
        assert image.text["parameters"] == text
    with pytest.raises(UsageError, match="already exists"):
        imgs.save_png(photo(20, 20), path, "other")
    with Image.open(path) as image:
        assert image.size == (70, 50)  # untouched
    imgs.save_png(photo(20, 20), path, "other", overwrite=True)
    with Image.open(path) as image:
        assert image.size == (20, 20) and image.text["parameters"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_output_paths(tmp_path):
    assert imgs.output_paths(tmp_path / "a.png", 1) == [tmp_path / "a.png"]
    assert imgs.output_paths(tmp_path / "a.png", 2) == [tmp_path / "a-0.png", tmp_path / "a-1.png"]
    (tmp_path / "a-1.png").write_bytes(b"")
    with pytest.raises(UsageError, match="a-1.png already exists"):
        imgs.check_writable(imgs.output_paths(tmp_path / "a.png", 2), overwrite=False)
    imgs.check_writable(imgs.output_paths(tmp_path / "a.png", 2), overwrite=True)
    with pytest.raises(UsageError, match="does not exist"):
        imgs.check_writable([tmp_path / "nope" / "a.png"], overwrite=False)
