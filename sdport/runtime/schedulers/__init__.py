"""Diffusion schedulers in pure NumPy, matching diffusers 0.42 to float32 rounding.

    from sdport.runtime.schedulers import denoise, available
    x0 = denoise("euler", scheduler_config, model, latents, steps=30, rng=np.random.default_rng(0))

A name picks the algorithm; a diffusers `scheduler_config.json` dict (of any scheduler class)
picks the numbers, exactly as `<Class>.from_config(config)` would. Randomness comes only from
the `rng` passed in, through `rng.standard_normal(latents.shape, dtype=np.float32)`, once per
place diffusers calls `randn_tensor`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sdport.errors import UsageError
from sdport.runtime.schedulers.ddim_ddpm import DDIM, DDPM
from sdport.runtime.schedulers.deis import DEIS
from sdport.runtime.schedulers.dpm_singlestep import DPMPP_2S
from sdport.runtime.schedulers.dpm_solver import DPMPP_2M, DPMPP_2M_SDE
from sdport.runtime.schedulers.k_samplers import EULER, EULER_ANCESTRAL, HEUN, LMS
from sdport.runtime.schedulers.kdpm2 import KDPM2, KDPM2_ANCESTRAL
from sdport.runtime.schedulers.lcm import LCM
from sdport.runtime.schedulers.pndm import PNDM
from sdport.runtime.schedulers.sampler import NoiseSource, Sampler
from sdport.runtime.schedulers.schedules import Schedule, karras_sigmas, read_config
from sdport.runtime.schedulers.unipc import UNIPC

__all__ = [
    "Schedule",
    "add_noise",
    "available",
    "denoise",
    "draws_noise",
    "karras_sigmas",
    "name_for_config",
    "request_names",
    "resolve_request",
    "schedule",
    "with_eta",
]

Model = Callable[[np.ndarray, float], np.ndarray]
Callback = Callable[[int, int, np.ndarray], None]

SAMPLERS: dict[str, Sampler] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "pndm": PNDM,
    "lms": LMS,
    "euler": EULER,
    "euler_ancestral": EULER_ANCESTRAL,
    "heun": HEUN,
    "dpm2": KDPM2,
    "dpm2_ancestral": KDPM2_ANCESTRAL,
    "dpmpp_2m": DPMPP_2M,
    "dpmpp_2m_sde": DPMPP_2M_SDE,
    "dpmpp_2s": DPMPP_2S,
    "unipc": UNIPC,
    "deis": DEIS,
    "lcm": LCM,
}


def available() -> tuple[str, ...]:
    """The scheduler names `denoise` accepts, e.g. "euler", "dpmpp_2m"."""
    return tuple(SAMPLERS)


# diffusers turns Karras sigmas on in the config (use_karras_sigmas); a request names them as a
# scheduler of its own, "<name>_karras" (as front ends list "DPM++ 2M Karras").
KARRAS = "_karras"


def request_names() -> tuple[str, ...]:
    """The scheduler names a request may give: available() and `<name>_karras` for each scheduler
    that has Karras sigmas."""
    karras = [name + KARRAS for name, sampler in SAMPLERS.items() if "use_karras_sigmas" in sampler.defaults]
    return (*SAMPLERS, *karras)


def resolve_request(name: Any, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A requested scheduler name and the folder's config -> (scheduler, config to run it with):
    `<name>_karras` is `name` with use_karras_sigmas on. UsageError for any other name."""
    base = name[: -len(KARRAS)] if isinstance(name, str) and name.endswith(KARRAS) else None
    if base in SAMPLERS:
        if "use_karras_sigmas" not in SAMPLERS[base].defaults:
            raise UsageError(
                f"scheduler {base!r} has no Karras sigmas variant; choose one of: {', '.join(request_names())}"
            )
        return base, {**config, "use_karras_sigmas": True}
    if not isinstance(name, str) or name not in SAMPLERS:
        raise UsageError(f"unknown scheduler {name!r}; choose one of: {', '.join(request_names())}")
    return name, dict(config)


def with_eta(name: str, config: Mapping[str, Any], eta: float) -> dict[str, Any]:
    """`config` with DDIM's eta (the argument diffusers' pipeline passes to DDIMScheduler.step, 0 by
    default): UsageError for a nonzero eta where scheduler `name` has none, as a likely mistake."""
    if not eta:
        return dict(config)
    if "eta" not in _sampler(name).defaults:
        users = [other for other, sampler in SAMPLERS.items() if "eta" in sampler.defaults]
        raise UsageError(f"eta applies to the {', '.join(users)} scheduler only, not to {name!r}")
    return {**config, "eta": eta}


def draws_noise(sampler: Sampler, cfg: Mapping[str, Any]) -> bool:
    """Whether a run draws noise: the stochastic schedulers', and DDIM's with eta > 0."""
    return sampler.stochastic or cfg.get("eta", 0.0) > 0


def name_for_config(config: Mapping[str, Any]) -> str | None:
    """The sdport name for a diffusers scheduler config's `_class_name`, or None if unsupported.

    DPMSolverMultistepScheduler maps on its algorithm_type: "dpmsolver++" (the default) to
    "dpmpp_2m", "sde-dpmsolver++" to "dpmpp_2m_sde"; the older "dpmsolver" types to None.
    """
    class_name = config.get("_class_name")
    if class_name == "DPMSolverSinglestepScheduler":
        return "dpmpp_2s" if config.get("algorithm_type", "dpmsolver++") == "dpmsolver++" else None
    if class_name == "DPMSolverMultistepScheduler":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        return {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}.get(algorithm)
    for name, sampler in SAMPLERS.items():
        if sampler.class_name == class_name:
            return name
    return None


def _sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise UsageError(f"unknown scheduler {name!r}; known schedulers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _setup(name: str, config: Mapping[str, Any], steps: int) -> tuple[Sampler, dict[str, Any], Schedule]:
    sampler = _sampler(name)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise UsageError(f"scheduler {name!r}: steps must be a positive integer, got {steps!r}")
    cfg = read_config(name, config, sampler.defaults, sampler.allowed)
    if steps > cfg["num_train_timesteps"]:
        raise UsageError(
            f"scheduler {name!r}: {steps} steps exceed num_train_timesteps={cfg['num_train_timesteps']}; "
            f"use at most {cfg['num_train_timesteps']} steps"
        )
    key = _hashable(cfg)
    if key is None:
        return sampler, cfg, sampler.schedule(cfg, int(steps))
    return sampler, cfg, _cached_schedule(name, key, int(steps))


# A pipeline asks for the same schedule three times per image (to check the request, to count
# the evaluations, to run them). Each making took 21 us, or 30-90 us right after a UNet run (cold
# caches); a tiny model's step is 1.5 ms, so that alone was most of its 1% overhead budget.
@functools.lru_cache(maxsize=64)
def _cached_schedule(name: str, cfg_items: tuple[tuple[str, str, Any], ...], steps: int) -> Schedule:
    sch = SAMPLERS[name].schedule({key: value for key, _, value in cfg_items}, steps)
    for value in vars(sch).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False  # shared by every caller now
    return sch


def _hashable(cfg: Mapping[str, Any]) -> tuple[tuple[str, str, Any], ...] | None:
    """cfg's items as a cache key (lists as tuples), or None if a value can't be hashed. Types are
    part of it: 1000 and 1000.0 are equal keys in Python, but may not make the same arrays."""
    items = tuple(sorted(
        (key, type(value).__name__, tuple(value) if isinstance(value, list) else value) for key, value in cfg.items()
    ))
    try:
        hash(items)
    except TypeError:
        return None
    return items


def schedule(name: str, config: Mapping[str, Any], steps: int) -> Schedule:
    """The timesteps, sigmas and initial noise scale scheduler `name` uses for `steps` steps.

    Args:
        name: one of `available()`.
        config: a diffusers scheduler config dict (unknown keys are ignored).
        steps: number of inference steps N.

    Returns:
        A `Schedule` of plain NumPy arrays and floats: `timesteps` has one entry per model
        evaluation (N, N + 1 for pndm, 2N - 1 for heun and dpm2), `sigmas` is None for ddim, ddpm, pndm
        and lcm. For hosts in other languages that run the steps themselves.
    """
    return _setup(name, config, steps)[2]


def _check_start(name: str, steps: int, start_step: int) -> None:
    if not 0 <= start_step <= steps:
        raise UsageError(f"scheduler {name!r}: start_step must be in [0, {steps}], got {start_step}")


def add_noise(
    name: str,
    config: Mapping[str, Any],
    original: np.ndarray,
    noise: np.ndarray,
    steps: int,
    start_step: int,
) -> np.ndarray:
    """Noise clean latents to where step `start_step` of an N-step run begins (image-to-image).

    Mirrors diffusers' StableDiffusionImg2ImgPipeline: with t_start = start_step (there
    `steps - int(steps * strength)`), `scheduler.set_begin_index(t_start * order)` then
    `scheduler.add_noise(original, noise, timesteps[t_start * order : t_start * order + 1])`.

    Args:
        name: one of `available()`.
        config: a diffusers scheduler config dict.
        original: clean latents, any shape.
        noise: standard normal noise of the same shape.
        steps: number of inference steps N of the whole schedule.
        start_step: the step the run starts at, 0 <= start_step <= N (N: returned unchanged).

    Returns:
        float32 noised latents, to pass to `denoise(..., start_step=start_step)`.
    """
    sampler, _, sch = _setup(name, config, steps)
    _check_start(name, steps, start_step)
    if start_step == steps:
        return np.asarray(original, dtype=np.float32)
    x0, z = np.asarray(original, dtype=np.float32), np.asarray(noise, dtype=np.float32)
    return sampler.add_noise(sch, start_step * sch.order, x0, z).astype(np.float32)


def denoise(
    name: str,
    config: Mapping[str, Any],
    model: Model,
    latents: np.ndarray,
    steps: int,
    *,
    rng: NoiseSource | None = None,
    start_step: int = 0,
    callback: Callback | None = None,
) -> np.ndarray:
    """Run scheduler `name` for `steps` steps from noise (or from noised latents) to x0.

    Args:
        name: one of `available()`; unknown names raise `UsageError` listing the known ones.
        config: a diffusers scheduler config dict, of this scheduler's class or another
            (unknown keys are ignored, like `<Class>.from_config(config)`).
        model: `model(x_in, t) -> eps` (or v, or x0, per the config's prediction_type), called
            once per model evaluation with the scaled model input (float32, latents' shape) and
            the timestep as a Python float, e.g. 981.0 (fractional for Euler with linspace).
        latents: unit-variance noise, multiplied by the schedule's initial sigma here; when
            `start_step > 0`, latents already noised by `add_noise` and used as they are.
        steps: number of inference steps N.
        rng: the only source of randomness, needed by ddpm, euler_ancestral, dpm2_ancestral,
            dpmpp_2m_sde, lcm, and ddim with a config eta > 0 (`with_eta`):
            `rng.standard_normal(latents.shape, dtype=np.float32)` is called once per
            diffusers noise draw.
        start_step: image-to-image start, the index into the N-step schedule (diffusers'
            `t_start`); evaluations begin at `timesteps[start_step * order]`.
        callback: `callback(i, total, x)` after each scheduler step, i from 0 to total - 1.

    Returns:
        float32 array of the latents' shape.
    """
    sampler, cfg, sch = _setup(name, config, steps)
    _check_start(name, steps, start_step)
    if draws_noise(sampler, cfg) and rng is None:
        raise UsageError(f"scheduler {name!r} is stochastic: pass rng=np.random.default_rng(seed)")
    x = np.asarray(latents, dtype=np.float32)
    first = start_step * sch.order
    if first == 0:
        x = x * np.float32(sch.init_noise_sigma)
    total = sch.evaluations(start_step)
    state = sampler.state0
    for k, i in enumerate(range(first, len(sch.timesteps))):
        x_in = sampler.scale_input(sch, i, x)
        out = np.asarray(model(x_in, float(sch.timesteps[i])), dtype=np.float32)
        if out.shape != x.shape:
            raise UsageError(
                f"scheduler {name!r}: model returned shape {out.shape} for input {x.shape}; "
                "it must return one prediction per latent element"
            )
        x, state = sampler.step(cfg, sch, i, out, x, state, rng)
        if callback is not None:
            callback(k, total, x)
    return x.astype(np.float32, copy=False)
