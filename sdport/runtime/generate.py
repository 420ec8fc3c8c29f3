"""`sdport generate`: load a model folder, generate, save PNGs with their settings, summarise."""

from __future__ import annotations

import argparse
import logging
import secrets
import time
from pathlib import Path
from typing import Callable

from sdport.errors import UsageError
from sdport.runtime import images as imgs

Say = Callable[[str], None]
logger = logging.getLogger(__name__)
RANDOM_SEED = -1  # --seed -1: AUTOMATIC1111's "random"


def run_generate(args: argparse.Namespace, say: Say | None) -> int:
    """Runs the `generate` subcommand; `say` is None with --quiet (no progress bar, no summary)."""
    from sdport.models.manifest import read_manifest
    from sdport.runtime.pipeline import Pipeline
    from sdport.runtime.request_checks import DEFAULT_STRENGTH, check_request, check_size
    from sdport.runtime.schedulers import resolve_request, with_eta
    from sdport.runtime.sessions import resolve_provider

    # Cheap checks first: loading an SD-sized model takes seconds, a typo should not.
    if args.strength is not None and args.image is None:
        logger.warning("--strength applies to image-to-image only (with --image): ignored")
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {args.num_images}")
    prompts = args.prompt  # one or more (nargs="+")
    seed = secrets.randbelow(2**32) if args.seed == RANDOM_SEED else args.seed
    if args.seed == RANDOM_SEED and say:
        say(f"seed: {seed} (random)")
    check_request(prompt=prompts, negative_prompt=args.negative, steps=args.steps, guidance=args.guidance,
                  seed=seed, num_images=args.num_images, strength=strength, eta=args.eta,
                  guidance_rescale=args.guidance_rescale, clip_skip=args.clip_skip)
    if args.scheduler is not None:  # an unknown name, or eta for one without, fails here, not after the load
        with_eta(resolve_request(args.scheduler, {})[0], {}, args.eta)
    resolve_provider(args.provider)
    image = None
    if args.image is not None:
        if not Path(args.image).exists():
            raise UsageError(f"input image {args.image} not found")
        if not Path(args.image).is_file():
            raise UsageError(f"input image {args.image} is not a file; pass an image file")
        # Read and checked now: a truncated download or a text file should not cost a model load.
        image = imgs.load_image(args.image, say)
    manifest = read_manifest(Path(args.model))
    if args.width is not None or args.height is not None:
        size = manifest.default_image_size
        check_size(manifest, size if args.width is None else args.width, size if args.height is None else args.height)
    paths = imgs.output_paths(args.out, args.num_images * len(prompts))
    imgs.check_writable(paths, args.overwrite)  # before any work, not after the last step

    started = time.perf_counter()
    pipe = Pipeline.load(args.model, provider=args.provider, low_memory=args.low_memory, say=say)
    loaded = time.perf_counter()
    step_times: list[float] = []

    def on_step(_step: int, _total: int, _latents) -> None:
        step_times.append(time.perf_counter())

    generating = time.perf_counter()
    pictures = pipe.generate(
        prompt=prompts,
        negative_prompt=args.negative,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        seed=seed,
        scheduler=args.scheduler,
        num_images=args.num_images,
        image=image,
        strength=strength,
        noise=args.noise,
        eta=args.eta,
        guidance_rescale=args.guidance_rescale,
        clip_skip=args.clip_skip,
        callback=on_step,
        progress=say is not None,
    )
    width, height = pictures[0].size
    scheduler = args.scheduler or pipe.default_scheduler
    for i, (picture, path) in enumerate(zip(pictures, paths)):
        text = imgs.parameters_text(
            prompt=prompts[i // args.num_images], negative_prompt=args.negative, steps=args.steps, sampler=scheduler,
            guidance=args.guidance, seed=seed + i, width=width, height=height,
            model=Path(args.model).resolve().name,
            strength=strength if args.image else None,
            noise=args.noise if args.noise != "portable" else None,
            eta=args.eta, guidance_rescale=args.guidance_rescale, clip_skip=args.clip_skip,
        )
        imgs.save_png(picture, path, text, overwrite=args.overwrite)
    finished = time.perf_counter()
    if say:
        # Per UNet step (a scheduler step: pndm makes steps + 1, heun about 2 * steps), text
        # encoding included; the VAE decode is in the total only.
        per_step = (step_times[-1] - generating) / len(step_times) if step_times else 0.0
        each = f"{per_step:.2f} s" if per_step >= 0.1 else f"{per_step * 1000:.1f} ms"  # a tiny model's: ~1 ms
        say(
            f"{pipe.provider}: {len(step_times)} UNet steps at {each} each, load "
            f"{loaded - started:.1f} s, total {finished - started:.1f} s -> {', '.join(str(p) for p in paths)}"
        )
    return 0
