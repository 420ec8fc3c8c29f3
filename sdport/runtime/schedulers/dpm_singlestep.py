"""DPM-Solver++(2S), the singlestep form (diffusers' DPMSolverSinglestepScheduler, dpmsolver++,
solver_order 2).

Steps go in pairs: a first-order step from sigma_{k-1} to sigma_k only to evaluate the model
there, then one second-order step from the x kept at sigma_{k-1} straight to sigma_{k+1} with
both x0 predictions (the multistep solver's update, dpm_solver.update). With an even step count
the last pair is two first-order steps; the last step, to sigma 0, is always first order.
Timesteps are always linspace-spaced (the class has no timestep_spacing).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from sdport.runtime.schedulers import schedules as S
from sdport.runtime.schedulers.dpm_solver import multistep_sigmas, update
from sdport.runtime.schedulers.sampler import Sampler, add_noise_vp, at_defaults, identity_input, vp_lambda, x0_from_vp
from sdport.runtime.schedulers.schedules import F32, LINEAR_BETAS, Config, Schedule

_DEFAULTS = {
    **LINEAR_BETAS,
    "prediction_type": "epsilon",
    "solver_type": "midpoint",
    "lower_order_final": False,
    "use_karras_sigmas": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    # implemented only at their defaults:
    "thresholding": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "variance_type": None,
    "use_dynamic_shifting": False,
}
_ALLOWED = {
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "solver_type": ("midpoint", "heun"),
    "final_sigmas_type": ("zero", "sigma_min"),
    **at_defaults(
        _DEFAULTS, "thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "variance_type",
        "use_dynamic_shifting",
    ),
}


class SinglestepState(NamedTuple):
    """The last step's x0 prediction and the x the last first-order step started from."""

    x0_prev: np.ndarray | None = None
    x_start: np.ndarray | None = None


def _schedule(cfg: Config, steps: int) -> Schedule:
    ac = S.alphas_cumprod(cfg)
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
    clipped = int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
    linspace = {**cfg, "timestep_spacing": "linspace", "steps_offset": 0}
    ts, sigmas = multistep_sigmas(linspace, steps, cfg["num_train_timesteps"] - clipped)
    if cfg["final_sigmas_type"] == "sigma_min":
        sigmas[-1] = S.sigma_table(ac)[0]
    return Schedule(ts.round().astype(np.int64), sigmas, 1.0, 1, steps, ac, F32(1.0))


@functools.lru_cache(maxsize=64)
def orders(steps: int, lower_order_final: bool, final_zero: bool) -> tuple[int, ...]:
    """diffusers' get_order_list for solver_order 2, which turns lower_order_final on where the
    steps are odd or the last sigma is 0."""
    if lower_order_final or steps % 2 or final_zero:
        plan = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    else:
        plan = [1, 2] * (steps // 2)
    if final_zero:
        plan[-1] = 1
    return tuple(plan)


def dpmpp_2s_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: SinglestepState, rng: None):
    x0 = x0_from_vp(cfg["prediction_type"], out, x, sch.sigmas[i])
    order = orders(sch.steps, cfg["lower_order_final"], cfg["final_sigmas_type"] == "zero")[i]
    if order == 1 or state.x0_prev is None:  # image-to-image may start on a pair's second step
        return update(cfg, sch.sigmas[i], sch.sigmas[i + 1], x, x0, None, None), SinglestepState(x0, x)
    _, _, lambda_t = vp_lambda(sch.sigmas[i + 1])
    _, _, lambda_s0 = vp_lambda(sch.sigmas[i])
    _, _, lambda_s1 = vp_lambda(sch.sigmas[i - 1])
    r0 = (lambda_s0 - lambda_s1) / (lambda_t - lambda_s1)
    d1 = (1.0 / r0) * (x0 - state.x0_prev)
    x_next = update(cfg, sch.sigmas[i - 1], sch.sigmas[i + 1], state.x_start, state.x0_prev, d1, None)
    return x_next, SinglestepState(x0, state.x_start)


DPMPP_2S = Sampler(
    class_name="DPMSolverSinglestepScheduler",
    defaults=_DEFAULTS,
    allowed=_ALLOWED,
    schedule=_schedule,
    scale_input=identity_input,
    step=dpmpp_2s_step,
    add_noise=add_noise_vp,
    state0=SinglestepState(),
)
