"""The shape every scheduler shares, and the few formulas more than one family uses.

A scheduler is a `Sampler`: a schedule function and a step function over explicit state.

    sch = sampler.schedule(cfg, steps)
    state = sampler.state0
    for i in range(first, len(sch.timesteps)):
        eps = model(sampler.scale_input(sch, i, x), sch.timesteps[i])
        x, state = sampler.step(cfg, sch, i, eps, x, state, rng)

Arithmetic in steps is float32 like diffusers' (scalars are np.float32 or Python floats, which
NumPy 2 keeps float32); `sqrt` stands where diffusers writes `** 0.5`, as torch does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np

from sdport.errors import UsageError
from sdport.runtime.schedulers.schedules import F32, Config, Schedule


class NoiseSource(Protocol):
    """The one method of `np.random.Generator` the stochastic samplers call."""

    def standard_normal(self, size: tuple[int, ...], dtype: type = ...) -> np.ndarray: ...


State = Any


class Sampler(NamedTuple):
    """One scheduler: its diffusers twin, its config keys, and its schedule/step functions."""

    class_name: str  # the diffusers class it reproduces
    defaults: Mapping[str, Any]  # the keys that class accepts and changes numbers with, its defaults
    allowed: Mapping[str, tuple[Any, ...]]  # keys with values sdport does not implement
    schedule: Callable[[Config, int], Schedule]
    scale_input: Callable[[Schedule, int, np.ndarray], np.ndarray]
    step: Callable[[Config, Schedule, int, np.ndarray, np.ndarray, State, NoiseSource | None], tuple[np.ndarray, State]]
    add_noise: Callable[[Schedule, int, np.ndarray, np.ndarray], np.ndarray]
    state0: State = None
    stochastic: bool = False


def at_defaults(defaults: Mapping[str, Any], *keys: str) -> dict[str, tuple[Any, ...]]:
    """`Sampler.allowed` entries for config keys sdport implements only at the class's default."""
    return {key: (defaults[key],) for key in keys}


def draw_noise(rng: NoiseSource | None, shape: tuple[int, ...]) -> np.ndarray:
    """One float32 standard-normal draw, where diffusers calls `randn_tensor`."""
    if rng is None:
        raise UsageError("this scheduler is stochastic: pass rng=np.random.default_rng(seed)")
    return np.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=F32)


def identity_input(sch: Schedule, i: int, x: np.ndarray) -> np.ndarray:
    """The model sees the latents as they are (alpha_bar-parameterised schedulers)."""
    return x


def karras_input(sch: Schedule, i: int, x: np.ndarray) -> np.ndarray:
    """x / sqrt(sigma^2 + 1): the k-diffusion input scaling of sigma-parameterised samplers."""
    sigma = sch.sigmas[i]
    return x / np.sqrt(sigma * sigma + 1)


# --- model output -> x0 --------------------------------------------------------------------


def x0_from_alpha_bar(prediction: str, out: np.ndarray, x: np.ndarray, alpha_bar: np.float32) -> np.ndarray:
    """x0 from the model output at alpha_bar_t (DDPM parameterisation)."""
    beta_bar = 1 - alpha_bar
    if prediction == "epsilon":
        return (x - np.sqrt(beta_bar) * out) / np.sqrt(alpha_bar)
    if prediction == "v_prediction":
        return np.sqrt(alpha_bar) * x - np.sqrt(beta_bar) * out
    return out  # "sample"


def x0_from_sigma(prediction: str, out: np.ndarray, x: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x0 from the model output at noise level sigma, x = x0 + sigma * eps (k-diffusion)."""
    if prediction == "epsilon":
        return x - sigma * out
    if prediction == "v_prediction":
        return out * (-sigma / np.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    return out  # "sample"


def vp_alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of the variance-preserving x_t = alpha_t x0 + sigma_t eps at sigma."""
    alpha_t = 1 / np.sqrt(sigma * sigma + 1)
    return alpha_t, sigma * alpha_t


# Cached: the multistep solvers ask for it 2-5 times a step, for sigmas they asked for the step
# before, and at 2.3 us a call (NumPy scalar arithmetic) that was half of a DPM-Solver++ step.
# typed, so a float64 sigma never gets a float32 one's answer.
@functools.lru_cache(maxsize=1024, typed=True)
def vp_lambda(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """(alpha_t, sigma_t, lambda_t = log alpha_t - log sigma_t); lambda is inf at sigma 0."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return alpha_t, sigma_t, np.log(alpha_t) - np.log(sigma_t)


def x0_from_vp(prediction: str, out: np.ndarray, x: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x0 from the model output, x = alpha_t x0 + sigma_t eps (DPM-Solver++, UniPC)."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    if prediction == "epsilon":
        return (x - sigma_t * out) / alpha_t
    if prediction == "v_prediction":
        return alpha_t * x - sigma_t * out
    return out  # "sample"


def clip_x0(cfg: Config, x0: np.ndarray) -> np.ndarray:
    """clip_sample: clamp x0 to [-clip_sample_range, clip_sample_range] when on."""
    if not cfg.get("clip_sample", False):
        return x0
    r = cfg["clip_sample_range"]
    return np.clip(x0, -r, r)


# --- img2img noising -----------------------------------------------------------------------


def add_noise_alpha_bar(sch: Schedule, i: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise at t = timesteps[i]."""
    alpha_bar = sch.alphas_cumprod[int(sch.timesteps[i])]
    return np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise


def add_noise_sigma(sch: Schedule, i: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """x0 + sigma_i noise (k-diffusion samplers)."""
    return x0 + noise * sch.sigmas[i]


def add_noise_vp(sch: Schedule, i: int, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """alpha_t x0 + sigma_t noise at sigmas[i] (DPM-Solver, UniPC)."""
    alpha_t, sigma_t = vp_alpha_sigma(sch.sigmas[i])
    return alpha_t * x0 + sigma_t * noise
