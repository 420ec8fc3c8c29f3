"""DEIS, the diffusion exponential integrator sampler of Zhang and Chen 2022, in its "log-rho"
multistep form (diffusers' DEISMultistepScheduler).

In rho = sigma_t / alpha_t, x / alpha is an integral of the noise prediction eps over rho; DEIS
fits a polynomial in log rho through the last `solver_order` (1-3, default 2) eps predictions
and integrates it exactly:

    x_t = alpha_t (x_s / alpha_s + sum_k c_k eps_k)

(first order: x_t = alpha_t / alpha_s x_s - sigma_t (e^h - 1) eps, h = lambda_t - lambda_s).
The first steps work up to the order; with fewer than 15 steps the last two step down again
(lower_order_final). The schedule ends at the sigma of t = 0, not 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sdport.runtime.schedulers import schedules as S
from sdport.runtime.schedulers.dpm_solver import multistep_sigmas
from sdport.runtime.schedulers.sampler import (
    Sampler,
    add_noise_vp,
    at_defaults,
    identity_input,
    vp_alpha_sigma,
    vp_lambda,
    x0_from_vp,
)
from sdport.runtime.schedulers.schedules import F32, LINEAR_BETAS, Config, Schedule

_DEFAULTS = {
    **LINEAR_BETAS,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "algorithm_type": "deis",
    "solver_type": "logrho",
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    # implemented only at their defaults:
    "thresholding": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}
_ALLOWED = {
    "solver_order": (1, 2, 3),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    # diffusers maps DPM-Solver's and UniPC's algorithm and solver types to DEIS' own
    "algorithm_type": ("deis", "dpmsolver", "dpmsolver++"),
    "solver_type": ("logrho", "midpoint", "heun", "bh1", "bh2"),
    **at_defaults(
        _DEFAULTS, "thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"
    ),
}
_LOWER_ORDER_FINAL_BELOW = 15  # steps: diffusers steps the order down at the end only below this


class DEISState(NamedTuple):
    """The last eps predictions (newest last, up to solver_order) and how many steps have run."""

    eps: tuple[np.ndarray, ...] = ()
    lower_order_nums: int = 0


def _schedule(cfg: Config, steps: int) -> Schedule:
    """DPM-Solver's sigmas, Karras timesteps rounded, but the last step ends at the sigma of t = 0
    (with Karras sigmas: at the last one again), not at 0."""
    ac = S.alphas_cumprod(cfg)
    ts, sigmas = multistep_sigmas(cfg, steps, cfg["num_train_timesteps"])
    sigmas[-1] = sigmas[-2] if cfg["use_karras_sigmas"] else S.sigma_table(ac)[0]
    return Schedule(ts.round().astype(np.int64), sigmas, 1.0, 1, steps, ac, F32(1.0))


def _log_rho_coefficient(t: np.float32, b: np.float32, c: np.float32, d: np.float32 | None = None) -> np.float32:
    """diffusers' ind_fn: the antiderivative at rho = t of the Lagrange basis polynomial (in
    log rho) of node b against c (and d, third order)."""
    log_t, log_b, log_c = np.log(t), np.log(b), np.log(c)
    if d is None:
        return t * (-log_c + log_t - 1) / (log_b - log_c)
    log_d = np.log(d)
    numerator = t * (log_c * (log_d - log_t + 1) - log_d * log_t + log_d + log_t * log_t - 2 * log_t + 2)
    return numerator / ((log_b - log_c) * (log_b - log_d))


def deis_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: DEISState, rng: None):
    order_max = cfg["solver_order"]
    alpha_s, sigma_s, lambda_s = vp_lambda(sch.sigmas[i])
    # diffusers turns every prediction type into eps through x0, and keeps the eps
    eps = (x - alpha_s * x0_from_vp(cfg["prediction_type"], out, x, sch.sigmas[i])) / sigma_s
    history = (*state.eps, eps)[-order_max:]
    steps_left = len(sch.timesteps) - i
    final = cfg["lower_order_final"] and len(sch.timesteps) < _LOWER_ORDER_FINAL_BELOW
    order = min(order_max, state.lower_order_nums + 1, steps_left if final else order_max)
    alpha_t, sigma_t, lambda_t = vp_lambda(sch.sigmas[i + 1])
    if order == 1:
        x_next = (alpha_t / alpha_s) * x - (sigma_t * (np.exp(lambda_t - lambda_s) - 1.0)) * eps
    else:
        rho_t = sigma_t / alpha_t
        rhos = [s / a for a, s in (vp_alpha_sigma(sch.sigmas[i - k]) for k in range(order))]  # s0, s1(, s2)
        total = x / alpha_s
        for k in range(order):
            others = rhos[k + 1 :] + rhos[:k]  # diffusers' argument order: the nodes after k, cyclically
            coefficient = _log_rho_coefficient(rho_t, rhos[k], *others) - _log_rho_coefficient(rhos[0], rhos[k], *others)
            total = total + coefficient * history[-1 - k]
        x_next = alpha_t * total
    return x_next, DEISState(history, min(state.lower_order_nums + 1, order_max))


DEIS = Sampler(
    class_name="DEISMultistepScheduler",
    defaults=_DEFAULTS,
    allowed=_ALLOWED,
    schedule=_schedule,
    scale_input=identity_input,
    step=deis_step,
    add_noise=add_noise_vp,
    state0=DEISState(),
)
