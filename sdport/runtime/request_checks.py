"""The checks of a generate request, made before any graph runs (the CLI's before a model loads).

Each bad value is a UsageError naming it, with what would be accepted.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from sdport.errors import UsageError
from sdport.models.manifest import Manifest


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    if not _integer(value) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# 8192 px a side is a 1024 x 1024 latent: a million attention tokens, far past what SD 1.x/2.x
# can denoise in memory; larger requests are typos (an extra 0), refused before any allocation.
MAX_SIDE = 8192
# One call is one batch (2 x num_images through the UNet with guidance): past 64 the batch no
# longer fits any GPU at SD sizes, and a million is a typo that would exhaust host memory first.
MAX_IMAGES = 64
DEFAULT_STRENGTH = 0.8  # image-to-image, as diffusers' img2img pipeline


def check_size(manifest: Manifest, width: Any, height: Any) -> None:
    """Width and height must be positive multiples of the VAE's times the UNet's down-sampling."""
    multiple = manifest.vae_scale * manifest.latent_multiple
    for label, value in (("width", width), ("height", height)):
        if not _integer(value) or value < multiple:
            raise UsageError(f"{label} must be an integer of at least {multiple} pixels, got {value!r}")
        if value > MAX_SIDE:
            raise UsageError(f"{label} {value} is too large: at most {MAX_SIDE} pixels a side")
        if value % multiple:
            lower = value - value % multiple
            raise UsageError(
                f"{label} {value} is not a multiple of {multiple} (the VAE's {manifest.vae_scale}x times "
                f"the UNet's {manifest.latent_multiple}x down-sampling); use {lower or multiple}"
                + (f" or {lower + multiple}" if lower else "")
            )


def check_text(name: str, value: Any) -> str:
    """A prompt: any length and any Unicode, but a string that can be encoded (no lone surrogates)."""
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"{name} is not valid Unicode (a lone surrogate {value[exc.start]!r} at character {exc.start}, "
            f"e.g. from a mis-decoded command line); pass UTF-8 text"
        ) from None
    return value


def text_labels(name: str, count: int) -> list[str]:
    """How messages name each of `count` texts: `name` alone for one, "name 0", "name 1", ... for more."""
    return [name] if count == 1 else [f"{name} {i}" for i in range(count)]


def _texts(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [check_text(name, value)]
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if not value:
        raise UsageError(f"{name} is an empty list; pass at least one text")
    return [check_text(label, text) for label, text in zip(text_labels(name, len(value)), value)]


def prompt_batch(prompt: Any, negative_prompt: Any) -> tuple[list[str], list[str]]:
    """The prompts of one call and a negative prompt for each, as diffusers pairs them: one prompt
    or a list; one negative prompt for all (None: "") or a list as long as the prompts'."""
    prompts = _texts("prompt", prompt)
    negatives = _texts("negative_prompt", "" if negative_prompt is None else negative_prompt)
    if len(negatives) == 1 and not isinstance(negative_prompt, (list, tuple)):
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise UsageError(
            f"negative_prompt is a list of {len(negatives)} for {len(prompts)} prompt(s); pass one negative "
            f"prompt for all, or one per prompt"
        )
    return prompts, negatives


def check_request(
    *, prompt: Any, negative_prompt: Any, steps: Any, guidance: Any, seed: Any, num_images: Any,
    strength: Any = DEFAULT_STRENGTH, image_to_image: bool = True, eta: Any = 0.0, guidance_rescale: Any = 0.0,
    clip_skip: Any = 0,
) -> tuple[list[str], list[str]]:
    """The checks of `generate` that need no model, so the CLI can make them before loading one;
    returns the call's prompts and a negative prompt for each (prompt_batch).

    `num_images` is per prompt; `strength` is checked only for `image_to_image` (text-to-image
    ignores it).
    """
    prompts, negatives = prompt_batch(prompt, negative_prompt)
    _positive_int("steps", steps)
    if _positive_int("num_images", num_images) * len(prompts) > MAX_IMAGES:
        many = f"num_images {num_images}" if len(prompts) == 1 else f"{len(prompts)} prompts x num_images {num_images}"
        raise UsageError(
            f"{many} is too many for one batch: at most {MAX_IMAGES} images; generate more "
            f"with further calls and other seeds"
        )
    _finite("guidance", guidance)
    if not _integer(seed) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    if image_to_image and not 0 <= _finite("strength", strength) <= 1:
        raise UsageError(f"strength must be in [0, 1], got {strength}")
    if _finite("eta", eta) < 0:
        raise UsageError(f"eta must be 0 or more, got {eta}")
    if not 0 <= _finite("guidance_rescale", guidance_rescale) <= 1:
        raise UsageError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if not _integer(clip_skip) or clip_skip < 0:
        raise UsageError(f"clip_skip must be 0 (off) or a positive integer, got {clip_skip!r}")
    return prompts, negatives
