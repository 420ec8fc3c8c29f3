"""Noise schedules: beta tables, alpha_bar, sigma tables, timestep spacing, Karras sigmas.

Everything here is a small pure function of config values. The numbers mirror diffusers 0.42:
tables that diffusers builds in float32 torch are built in float32 here with the same
rounding (see `linspace_f32` and `alphas_cumprod`), tables it builds in float64 NumPy stay
float64 until diffusers casts them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdport.errors import UsageError

Config = Mapping[str, Any]

F32 = np.float32

# diffusers' default noise schedule: the constructor defaults of most scheduler classes (KDPM2's
# differ), which a config without these keys runs with.
LINEAR_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


@dataclass(frozen=True)
class Schedule:
    """What a scheduler uses for one run of `steps` steps, as plain NumPy values.

    timesteps:         (S,) the value passed to the model at each evaluation, in order; S is
                       `steps`, `steps + 1` (pndm) or `2 * steps - 1` (heun, dpm2, dpm2_ancestral).
    sigmas:            (S + 1,) float32 noise levels, last one 0 (deis: sigma at t = 0), for
                       sigma-based schedulers;
                       None for the alpha_bar-indexed ones (ddim, ddpm, pndm, lcm).
    init_noise_sigma:  the factor unit-variance latents are multiplied by before step 0.
    order:             model evaluations per step as diffusers counts them (2 for heun): the
                       img2img start index into `timesteps` is `start_step * order`.
    steps:             the number of steps asked for.
    alphas_cumprod:    (T,) float32 alpha_bar over the training timesteps.
    final_alpha_cumprod: alpha_bar used when a step goes past t = 0 (ddim, pndm, lcm).
    """

    timesteps: np.ndarray
    sigmas: np.ndarray | None
    init_noise_sigma: float
    order: int
    steps: int
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float

    def evaluations(self, start_step: int = 0) -> int:
        """Model evaluations of a run that starts at step `start_step` (image-to-image)."""
        return len(self.timesteps) - start_step * self.order


def read_config(
    name: str,
    config: Config,
    defaults: Mapping[str, Any],
    allowed: Mapping[str, tuple[Any, ...]],
) -> dict[str, Any]:
    """Take the keys a diffusers class accepts from `config`, with that class's defaults.

    Works like `SchedulerClass.from_config(config)`: keys the class does not accept (including
    `_class_name` and keys of other scheduler classes) are ignored. `allowed` lists, for keys
    whose other values sdport does not implement, the values it does; anything else raises.
    """
    cfg = dict(defaults)
    cfg.update({key: config[key] for key in defaults if key in config})
    for key, values in allowed.items():
        if cfg[key] not in values:
            raise UsageError(
                f"scheduler {name!r}: config {key}={cfg[key]!r} is not supported; "
                f"sdport implements {key} in {list(values)}"
            )
    return cfg


# --- beta and alpha_bar tables -------------------------------------------------------------


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=float32)` bit for bit.

    torch steps in float32 from both ends (start + step*i for the first half, end - step*(n-1-i)
    for the second) with a fused multiply-add, which float64 then one rounding reproduces.
    """
    start32, end32 = F32(start), F32(end)
    step = np.float64((end32 - start32) / F32(max(n - 1, 1)))
    i = np.arange(n)
    out = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i))
    return out.astype(F32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """`torch.cumprod` of a float32 vector: torch accumulates in float64 on CPU."""
    return np.cumprod(x.astype(np.float64)).astype(F32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """squaredcos_cap_v2: betas from alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)], dtype=F32
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR (Lin et al. 2023)."""
    alpha_bar_sqrt = np.sqrt(cumprod_f32(F32(1.0) - betas))
    first, last = alpha_bar_sqrt[0], alpha_bar_sqrt[-1]
    alpha_bar_sqrt = (alpha_bar_sqrt - last) * (first / (first - last))
    alpha_bar = alpha_bar_sqrt * alpha_bar_sqrt
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return F32(1.0) - alphas


def betas(cfg: Config) -> np.ndarray:
    """(T,) float32 betas from num_train_timesteps, beta_start/end, beta_schedule or trained_betas.

    rescale_betas_zero_snr is applied when the class accepts it and it is on.
    """
    T = cfg["num_train_timesteps"]
    schedule = cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        b = np.asarray(cfg["trained_betas"], dtype=F32)
    elif schedule == "linear":
        b = linspace_f32(cfg["beta_start"], cfg["beta_end"], T)
    elif schedule == "scaled_linear":
        root = linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T)
        b = root * root
    elif schedule == "squaredcos_cap_v2":
        b = cosine_betas(T)
    else:
        raise UsageError(
            f"beta_schedule {schedule!r} is not supported; "
            "use 'linear', 'scaled_linear', 'squaredcos_cap_v2' or trained_betas"
        )
    if cfg.get("rescale_betas_zero_snr", False):
        b = rescale_zero_terminal_snr(b)
    return b


def alphas_cumprod(cfg: Config) -> np.ndarray:
    """(T,) float32 alpha_bar_t = prod_{s <= t} (1 - beta_s)."""
    return cumprod_f32(F32(1.0) - betas(cfg))


def alphas_cumprod_for_sigmas(cfg: Config) -> np.ndarray:
    """alpha_bar for sigma-based schedulers: a zero-SNR last entry becomes 2**-24.

    sigma = sqrt((1 - alpha_bar) / alpha_bar) would be infinite; diffusers' Euler, DPM-Solver
    and UniPC clamp it so sigma_max is 4096.
    """
    ac = alphas_cumprod(cfg)
    if cfg.get("rescale_betas_zero_snr", False):
        ac[-1] = F32(2.0**-24)
    return ac


def final_alpha_cumprod(cfg: Config, ac: np.ndarray) -> float:
    """alpha_bar "before t = 0": 1 with set_alpha_to_one, else alpha_bar_0."""
    return F32(1.0) if cfg["set_alpha_to_one"] else ac[0]


# --- timestep spacing ----------------------------------------------------------------------


def spaced_timesteps(spacing: str, steps: int, num_train_timesteps: int, steps_offset: int) -> np.ndarray:
    """(steps,) float64 descending timesteps, spaced as in "Common Diffusion Noise Schedules and
    Sample Steps are Flawed" table 2. linspace values are not rounded (Euler keeps the fraction).
    """
    T, n = num_train_timesteps, steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (T // n))[::-1] + float(steps_offset)
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round() - 1
    raise UsageError(f"timestep_spacing {spacing!r} is not supported; use 'leading', 'trailing' or 'linspace'")


def multistep_timesteps(
    spacing: str, steps: int, num_train_timesteps: int, steps_offset: int, last_timestep: int
) -> np.ndarray:
    """(steps,) int64 timesteps of DPM-Solver and UniPC: steps + 1 points, the last dropped."""
    T, n = num_train_timesteps, steps
    if spacing == "linspace":
        ts = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(n + 1) * (last_timestep // (n + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(last_timestep, 0, -T / n).round() - 1
    else:
        raise UsageError(f"timestep_spacing {spacing!r} is not supported; use 'leading', 'trailing' or 'linspace'")
    return ts.astype(np.int64)


# --- sigma tables --------------------------------------------------------------------------


def sigma_table(ac: np.ndarray) -> np.ndarray:
    """(T,) float32 sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending in t."""
    return np.sqrt((F32(1.0) - ac) / ac)


def interp_sigmas(timesteps: np.ndarray, table: np.ndarray) -> np.ndarray:
    """float64 sigmas at (possibly fractional) timesteps, linear in t."""
    return np.interp(timesteps, np.arange(len(table)), table)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """(n,) float64 descending sigmas of Karras et al. 2022, eq. 5."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_table: np.ndarray, float32: bool = False) -> np.ndarray:
    """Fractional timesteps whose sigma is `sigmas`, interpolating log sigma: float64, or with
    `float32` all in float32, as diffusers' KDPM2 classes compute it (on float32 tensors)."""
    if float32:
        sigmas, log_table = np.asarray(sigmas, dtype=F32), np.asarray(log_table, dtype=F32)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # (n,)
    dists = log_sigma[None, :] - log_table[:, None]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_table) - 2)
    high = low + 1
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[high]), 0, 1)
    if float32:
        return (F32(1) - w) * low.astype(F32) + w * high.astype(F32)
    return (1 - w) * low + w * high


def append_zero(sigmas: np.ndarray) -> np.ndarray:
    """(n + 1,) float32: the sigmas followed by the final sigma 0."""
    return np.concatenate([sigmas, [0.0]]).astype(F32)
