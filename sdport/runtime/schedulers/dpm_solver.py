"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++", algorithms 2 and sde).

Data prediction D = x0 in log-SNR time lambda = log(alpha_t / sigma_t), h = lambda_t - lambda_s:

    2M:     x_t = sigma_t/sigma_s x_s - alpha_t (e^{-h} - 1) D0 - 1/2 alpha_t (e^{-h} - 1) D1
    2M SDE: x_t = sigma_t/sigma_s e^{-h} x_s + alpha_t (1 - e^{-2h}) (D0 + D1/2)
                  + sigma_t sqrt(1 - e^{-2h}) z

with D0 = x0_i and D1 = (x0_i - x0_{i-1}) / r, r = h_{i-1} / h. The first step and the last
(to sigma 0) are first order. The order (2) and algorithm come from the name, not the config.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sdport.runtime.schedulers import schedules as S
from sdport.runtime.schedulers.sampler import (
    Sampler,
    add_noise_vp,
    at_defaults,
    draw_noise,
    identity_input,
    vp_lambda,
    x0_from_vp,
)
from sdport.runtime.schedulers.schedules import F32, LINEAR_BETAS, Config, Schedule

DEFAULTS = {
    **LINEAR_BETAS,
    "prediction_type": "epsilon",
    "solver_type": "midpoint",
    "use_karras_sigmas": False,
    "lambda_min_clipped": -float("inf"),
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    # implemented only at their defaults:
    "thresholding": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "variance_type": None,
    "use_dynamic_shifting": False,
}
ALLOWED = {
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    **at_defaults(
        DEFAULTS, "thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
        "final_sigmas_type", "variance_type", "use_dynamic_shifting",
    ),
}


class MultistepState(NamedTuple):
    """The previous step's x0 prediction and how many steps have run (capped at the order)."""

    x0_prev: np.ndarray | None = None
    lower_order_nums: int = 0


def multistep_sigmas(cfg: Config, steps: int, last_timestep: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (N,), float32 sigmas (N + 1,) ending in 0), shared with UniPC.

    With Karras sigmas the timesteps come back fractional (float64): DPM-Solver and UniPC differ
    in when they round them.
    """
    table = S.sigma_table(S.alphas_cumprod_for_sigmas(cfg))
    ts = S.multistep_timesteps(
        cfg["timestep_spacing"], steps, cfg["num_train_timesteps"], cfg["steps_offset"], last_timestep
    )
    if not cfg["use_karras_sigmas"]:
        return ts, S.append_zero(S.interp_sigmas(ts, table))
    # Karras over the whole table's range unless the config pins the ends.
    sigma_min = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else table[0]
    sigma_max = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else table[-1]
    sigmas = S.karras_sigmas(steps, float(sigma_min), float(sigma_max))
    return S.sigma_to_t(sigmas, np.log(table)), S.append_zero(sigmas)


def _schedule(cfg: Config, steps: int) -> Schedule:
    """lambda_min_clipped cuts off the noisiest timesteps (default: none)."""
    ac = S.alphas_cumprod_for_sigmas(cfg)
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))  # (T,) float32
    clipped = int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
    ts, sigmas = multistep_sigmas(cfg, steps, cfg["num_train_timesteps"] - clipped)
    if cfg["use_karras_sigmas"] and cfg["beta_schedule"] != "squaredcos_cap_v2":
        ts = ts.round()  # diffusers rounds, except for the cosine schedule (then it truncates)
    return Schedule(ts.astype(np.int64), sigmas, 1.0, 1, steps, ac, F32(1.0))


def update(cfg: Config, sigma_from: np.float32, sigma_to: np.float32, x: np.ndarray, d0: np.ndarray,
           d1: np.ndarray | None, z):
    """x at sigma_to from x at sigma_from (noise levels); first order when d1 is None."""
    alpha_t, sigma_t, lambda_t = vp_lambda(sigma_to)
    _, sigma_s, lambda_s = vp_lambda(sigma_from)
    h = lambda_t - lambda_s
    heun = cfg["solver_type"] == "heun"
    with np.errstate(over="ignore", invalid="ignore"):
        if z is None:  # dpmsolver++
            x_t = sigma_t / sigma_s * x - alpha_t * (np.exp(-h) - 1.0) * d0
            if d1 is not None and heun:
                x_t = x_t + alpha_t * ((np.exp(-h) - 1.0) / h + 1.0) * d1
            elif d1 is not None:
                x_t = x_t - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
        else:  # sde-dpmsolver++
            x_t = sigma_t / sigma_s * np.exp(-h) * x + alpha_t * (1 - np.exp(-2.0 * h)) * d0
            if d1 is not None and heun:
                x_t = x_t + alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * d1
            elif d1 is not None:
                x_t = x_t + 0.5 * (alpha_t * (1 - np.exp(-2.0 * h))) * d1
            x_t = x_t + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * z
    return x_t


def _step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: MultistepState, z):
    """One 2M step given the noise z (None for the ODE)."""
    x0 = x0_from_vp(cfg["prediction_type"], out, x, sch.sigmas[i])
    last = i == len(sch.timesteps) - 1  # final_sigmas_type "zero": the last step is first order
    if state.lower_order_nums < 1 or last:
        x_next = update(cfg, sch.sigmas[i], sch.sigmas[i + 1], x, x0, None, z)
    else:
        _, _, lambda_t = vp_lambda(sch.sigmas[i + 1])
        _, _, lambda_s0 = vp_lambda(sch.sigmas[i])
        _, _, lambda_s1 = vp_lambda(sch.sigmas[i - 1])
        r0 = (lambda_s0 - lambda_s1) / (lambda_t - lambda_s0)
        d1 = 1.0 / r0 * (x0 - state.x0_prev)
        x_next = update(cfg, sch.sigmas[i], sch.sigmas[i + 1], x, x0, d1, z)
    return x_next, MultistepState(x0, min(state.lower_order_nums + 1, 2))


def dpmpp_2m_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: MultistepState, rng: None):
    """DPM-Solver++(2M), deterministic."""
    return _step(cfg, sch, i, out, x, state, None)


def dpmpp_2m_sde_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: MultistepState, rng):
    """DPM-Solver++(2M) SDE: one noise draw per step, the last included (it is scaled by 0)."""
    return _step(cfg, sch, i, out, x, state, draw_noise(rng, x.shape))


DPMPP_2M = Sampler(
    class_name="DPMSolverMultistepScheduler",
    defaults=DEFAULTS,
    # diffusers maps UniPC's solver types (bh1, bh2, logrho) to midpoint
    allowed={**ALLOWED, "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2")},
    schedule=_schedule,
    scale_input=identity_input,
    step=dpmpp_2m_step,
    add_noise=add_noise_vp,
    state0=MultistepState(),
)

DPMPP_2M_SDE = DPMPP_2M._replace(step=dpmpp_2m_sde_step, stochastic=True)
