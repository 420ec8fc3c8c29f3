"""Images in and out: PIL <-> NumPy as diffusers' VaeImageProcessor does, and PNG files.

In:  any PIL image -> RGB -> Lanczos resize -> float32 [1, 3, H, W] in [-1, 1].
Out: float32 [B, 3, H, W] from the VAE -> (x / 2 + 0.5).clip(0, 1) as [B, H, W, 3]
     -> uint8 PIL with (x * 255).round(), exactly diffusers' `numpy_to_pil`.
PNGs carry the settings in a `parameters` text chunk, in AUTOMATIC1111's layout, so other
tools (and `Image.open(p).text["parameters"]`) read them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, PngImagePlugin

from sdport.errors import SdportError, UsageError

Say = Callable[[str], None]
# Modes with more than 8 bits per channel, which PIL's convert("RGB") clips rather than scales.
HIGH_DEPTH_MODES = {
    "I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit",
    "I;16N": "16-bit",
}


def load_image(source: str | os.PathLike | Image.Image, say: Say | None = None) -> Image.Image:
    """Opens `source` (a path or a PIL image) as an RGB image, saying what was converted."""
    if isinstance(source, Image.Image):
        image = source
        where = "input image"
    elif not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"input image must be a PIL image or a file path, got {type(source).__name__}")
    else:
        where = str(source)
        try:
            image = Image.open(source)
            image.load()
        except FileNotFoundError:
            raise UsageError(f"input image {where} not found") from None
        except IsADirectoryError:
            raise UsageError(f"input image {where} is a folder; pass an image file") from None
        except PermissionError:
            raise UsageError(f"input image {where}: permission denied; make it readable") from None
        except Image.DecompressionBombError as exc:  # a tiny file that claims billions of pixels
            raise UsageError(f"{where}: refused, {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UsageError(f"{where}: not an image PIL can read ({exc}); pass a PNG, JPEG or WebP") from None
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_DEPTH_MODES:
        # PIL's convert clips 16-bit and float pixels to 0..255 (an almost white image): refuse.
        raise UsageError(
            f"{where}: mode {image.mode} ({HIGH_DEPTH_MODES[image.mode]}) is not supported; save it as an "
            f"8-bit RGB image"
        )
    # As diffusers.utils.load_image: PIL's convert, which drops alpha (no compositing).
    try:
        converted = image.convert("RGB")
    except ValueError:  # modes PIL converts only via RGBA ("La", premultiplied grey with alpha)
        try:
            converted = image.convert("RGBA").convert("RGB")
        except ValueError:
            raise UsageError(
                f"{where}: mode {image.mode} cannot be converted to RGB; save it as an RGB image"
            ) from None
    dropped = " (alpha channel dropped)" if "A" in image.mode or "transparency" in image.info else ""
    note = f"{where}: mode {image.mode} converted to RGB{dropped}"
    if say:
        say(note)
    return converted


def preprocess(image: Image.Image, width: int, height: int) -> np.ndarray:
    """RGB PIL image -> float32 [1, 3, height, width] in [-1, 1] (VaeImageProcessor.preprocess)."""
    if image.mode != "RGB":
        raise UsageError(f"preprocess wants an RGB image, got mode {image.mode}; use load_image first")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)  # diffusers' default
    x = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    x = x.transpose(2, 0, 1)[None]  # [1, 3, H, W]
    return np.ascontiguousarray(2.0 * x - 1.0, dtype=np.float32)


def postprocess(decoded: np.ndarray) -> np.ndarray:
    """VAE output float32 [B, 3, H, W] in about [-1, 1] -> float32 [B, H, W, 3] in [0, 1]."""
    x = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """float32 [B, H, W, 3] in [0, 1] -> RGB PIL images, rounding as diffusers' numpy_to_pil."""
    pixels = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(p, mode="RGB") for p in pixels]


def parameters_text(
    *, prompt: str, negative_prompt: str, steps: int, sampler: str, guidance: float, seed: int,
    width: int, height: int, model: str, strength: float | None = None, noise: str | None = None,
    eta: float = 0.0, guidance_rescale: float = 0.0, clip_skip: int = 0,
) -> str:
    """The generation settings as AUTOMATIC1111 writes them in a PNG's `parameters` chunk; `noise`
    names a seeded generator other than the default (portable) one; eta, guidance_rescale and
    clip_skip are written where they are not 0 (clip_skip as AUTOMATIC1111 counts it, one more)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [
        f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {guidance:g}", f"Seed: {seed}",
        f"Size: {width}x{height}", f"Model: {model}",
    ]
    if strength is not None:
        fields.append(f"Denoising strength: {strength:g}")
    if noise is not None:
        fields.append(f"Noise: {noise}")
    if eta:
        fields.append(f"Eta DDIM: {eta:g}")
    if guidance_rescale:
        fields.append(f"Guidance rescale: {guidance_rescale:g}")
    if clip_skip:
        fields.append(f"Clip skip: {clip_skip + 1}")
    fields.append("Software: sdport")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def output_paths(out: str | os.PathLike, count: int) -> list[Path]:
    """`out` for one image; `out-0.png`, `out-1.png`, ... (same folder and suffix) for several."""
    out = Path(out)
    if count == 1:
        return [out]
    suffix = out.suffix or ".png"
    return [out.with_name(f"{out.stem}-{i}{suffix}") for i in range(count)]


def check_writable(paths: list[Path], overwrite: bool) -> None:
    """Refuses before any work is done: existing files (unless `overwrite`) or a missing folder."""
    for path in paths:
        if not path.parent.is_dir():
            raise UsageError(f"output folder {path.parent} does not exist; create it or choose another -o")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"output folder {path.parent} is not writable; choose another -o")
        if path.is_dir():
            raise UsageError(f"{path} is a folder; choose a file name for -o, e.g. {path / 'sdport.png'}")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} already exists; choose another -o or pass --overwrite to replace it")


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str, overwrite: bool = False) -> Path:
    """Writes `image` as a PNG with a `parameters` text chunk; never replaces a file unless `overwrite`.

    The PNG is written to a temporary file in the same folder first, then linked (no clobber) or
    renamed (overwrite) into place, so a reader never sees a half-written file.
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        # mkstemp makes the file private (0600); an image gets the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if `path` exists: no race between check and write
            except FileExistsError:
                raise UsageError(f"{path} already exists; pass --overwrite to replace it") from None
            except OSError:  # a filesystem without hard links: claim the name, then rename over it
                try:
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    raise UsageError(f"{path} already exists; pass --overwrite to replace it") from None
                os.replace(tmp, path)
    except OSError as exc:
        raise SdportError(f"could not write {path}: {exc.strerror or exc}; check the folder and free space") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
