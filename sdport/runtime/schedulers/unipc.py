"""UniPC, the unified predictor-corrector of Zhao et al. 2023 (B(h) = bh1 or bh2, x0 prediction).

Each step first corrects the current x with the fresh model output (UniC, using the previous
step's prediction), then predicts the next x (UniP) from the last `order` x0 predictions:

    x_t = sigma_t/sigma_s x_s - alpha_t h_phi_1 m0 - alpha_t B(h) sum_k rho_k D1_k

with hh = -h, h_phi_1 = e^{hh} - 1, D1_k = (m_k - m0) / r_k and rho solving R rho = b
(paper eq. 8 and algorithm 2).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sdport.runtime.schedulers.dpm_solver import multistep_sigmas
from sdport.runtime.schedulers.sampler import Sampler, add_noise_vp, at_defaults, identity_input, vp_lambda, x0_from_vp
from sdport.runtime.schedulers.schedules import F32, LINEAR_BETAS, Config, Schedule, alphas_cumprod_for_sigmas


class UniPCState(NamedTuple):
    """x0 predictions (oldest first, `solver_order` slots), the x before the last predictor,
    how many steps ran (capped at the order), and the order the last predictor used."""

    x0s: tuple[np.ndarray | None, ...] = ()
    x_last: np.ndarray | None = None
    lower_order_nums: int = 0
    order: int = 1


def _schedule(cfg: Config, steps: int) -> Schedule:
    """As DPM-Solver's, Karras timesteps always rounded."""
    ts, sigmas = multistep_sigmas(cfg, steps, cfg["num_train_timesteps"])
    if cfg["use_karras_sigmas"]:
        ts = ts.round()
    return Schedule(ts.astype(np.int64), sigmas, 1.0, 1, steps, alphas_cumprod_for_sigmas(cfg), F32(1.0))


def _bh_coefficients(cfg: Config, h: np.float32, rks: list, order: int):
    """(R, b, h_phi_1, B_h): the order-by-order linear system of UniPC's coefficients."""
    hh = -h  # x0 prediction
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        # diffusers maps DPM-Solver's solver types (midpoint, heun, logrho) to bh2
        B_h = hh if cfg["solver_type"] == "bh1" else np.expm1(hh)
        rks = np.array([*rks, 1.0], dtype=F32)
        R, b = [], []
        factorial_i = 1
        for i in range(1, order + 1):
            R.append(rks ** (i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
    return np.stack(R).astype(F32), np.array(b, dtype=F32), h_phi_1, B_h


def _differences(sch: Schedule, x0s: tuple, lambda_s0: np.float32, h: np.float32, order: int, first: int):
    """rks and D1s = (m_k - m0) / r_k over the past predictions; sigma of m_k is sigmas[first - k]."""
    rks, D1s = [], []
    for k in range(1, order):
        _, _, lambda_sk = vp_lambda(sch.sigmas[first - k])
        rk = (lambda_sk - lambda_s0) / h
        rks.append(rk)
        D1s.append((x0s[-(k + 1)] - x0s[-1]) / rk)
    return rks, D1s


def predictor(cfg: Config, sch: Schedule, i: int, x: np.ndarray, x0s: tuple, order: int) -> np.ndarray:
    """UniP-B(h): x at sigmas[i + 1] from x at sigmas[i]."""
    alpha_t, sigma_t, lambda_t = vp_lambda(sch.sigmas[i + 1])
    _, sigma_s0, lambda_s0 = vp_lambda(sch.sigmas[i])
    h = lambda_t - lambda_s0
    rks, D1s = _differences(sch, x0s, lambda_s0, h, order, i)
    R, b, h_phi_1, B_h = _bh_coefficients(cfg, h, rks, order)
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * x0s[-1]
    if D1s:
        rhos = np.array([0.5], dtype=F32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(F32)
        x_t = x_t - alpha_t * B_h * sum(rho * D1 for rho, D1 in zip(rhos, D1s))
    return x_t


def corrector(cfg: Config, sch: Schedule, i: int, x0: np.ndarray, x_last: np.ndarray, x: np.ndarray,
              x0s: tuple, order: int) -> np.ndarray:
    """UniC-B(h): refine x (at sigmas[i]) with its own x0, redoing the step from x_last."""
    alpha_t, sigma_t, lambda_t = vp_lambda(sch.sigmas[i])
    _, sigma_s0, lambda_s0 = vp_lambda(sch.sigmas[i - 1])
    h = lambda_t - lambda_s0
    rks, D1s = _differences(sch, x0s, lambda_s0, h, order, i - 1)
    R, b, h_phi_1, B_h = _bh_coefficients(cfg, h, rks, order)
    rhos = np.array([0.5], dtype=F32) if order == 1 else np.linalg.solve(R, b).astype(F32)
    x_t = sigma_t / sigma_s0 * x_last - alpha_t * h_phi_1 * x0s[-1]
    correction = sum(rho * D1 for rho, D1 in zip(rhos[:-1], D1s))
    return x_t - alpha_t * B_h * (correction + rhos[-1] * (x0 - x0s[-1]))


def unipc_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: UniPCState, rng: None):
    """Correct x with the new prediction, then predict the next x."""
    solver_order = cfg["solver_order"]
    x0s = state.x0s or (None,) * solver_order
    x0 = x0_from_vp(cfg["prediction_type"], out, x, sch.sigmas[i])
    # 1. corrector, with the order the last predictor used
    if i > 0 and (i - 1) not in cfg["disable_corrector"] and state.x_last is not None:
        x = corrector(cfg, sch, i, x0, state.x_last, x, x0s, state.order)
    x0s = (*x0s[1:], x0)
    # 2. predictor, lower order at the start and (lower_order_final) near the end
    order = min(solver_order, len(sch.timesteps) - i) if cfg["lower_order_final"] else solver_order
    order = min(order, state.lower_order_nums + 1)
    x_next = predictor(cfg, sch, i, x, x0s, order)
    return x_next, UniPCState(x0s, x, min(state.lower_order_nums + 1, solver_order), order)


_DEFAULTS = {
    **LINEAR_BETAS,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "use_karras_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    # implemented only at their defaults:
    "predict_x0": True,
    "thresholding": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "use_dynamic_shifting": False,
}


UNIPC = Sampler(
    class_name="UniPCMultistepScheduler",
    defaults=_DEFAULTS,
    allowed={
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "solver_type": ("bh1", "bh2", "midpoint", "heun", "logrho"),
        **at_defaults(
            _DEFAULTS, "predict_x0", "thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
            "final_sigmas_type", "use_dynamic_shifting",
        ),
    },
    schedule=_schedule,
    scale_input=identity_input,
    step=unipc_step,
    add_noise=add_noise_vp,
    state0=UniPCState(),
)
