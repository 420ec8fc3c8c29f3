"""DPM-Solver-2 in k-diffusion's form, plain and ancestral (diffusers' KDPM2DiscreteScheduler and
KDPM2AncestralDiscreteScheduler; "DPM2" and "DPM2 a" in AUTOMATIC1111's list).

Each step from sigma_k takes two model evaluations: an Euler half step to sigma_mid, the
geometric mean of sigma_k and where the step ends, then the full step with the slope found
there. The plain form ends at sigma_{k+1}; the ancestral one at sigma_down and adds sigma_up of
fresh noise (sigma_down^2 + sigma_up^2 = sigma_{k+1}^2), as Euler ancestral. The last step, to
sigma 0, is a lone Euler step: 2N - 1 evaluations in all.

The schedule lists the sigma each evaluation sees, [s_0, mid_1, s_1, mid_2, ..., s_{N-1}, 0],
so the model input scaling and the image-to-image noising are those of every k-sampler; a step
reads the sigmas around its evaluation from it. diffusers makes the midpoints in float32 torch
(log, lerp at 0.5, exp), and so does this.
"""

from __future__ import annotations

import numpy as np

from sdport.runtime.schedulers import schedules as S
from sdport.runtime.schedulers.k_samplers import ancestral_sigmas, init_sigma, spaced_sigmas
from sdport.runtime.schedulers.sampler import Sampler, add_noise_sigma, draw_noise, karras_input, x0_from_sigma
from sdport.runtime.schedulers.schedules import F32, Config, Schedule

_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
# diffusers raises NotImplementedError for prediction_type "sample" in both classes.
_ALLOWED = {
    "prediction_type": ("epsilon", "v_prediction"),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
}


def _geometric_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(torch.lerp(log a, log b, 0.5)) in float32, as torch computes it (end - diff * 0.5)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 = -inf where a sigma is 0
        log_a, log_b = np.log(a.astype(F32)), np.log(b.astype(F32))
        return np.exp(log_b - (log_b - log_a) * F32(0.5))


def _interleave(ends: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """[e_0, m_0, e_1, m_1, ..., e_{N-1}]: N ends and N - 1 midpoints."""
    out = np.empty(2 * len(ends) - 1, dtype=np.result_type(ends, mids))
    out[0::2], out[1::2] = ends, mids
    return out


def _schedule(cfg: Config, steps: int, ancestral: bool) -> Schedule:
    # Euler's, but Karras timesteps rounded, as diffusers does in these two classes
    ts, sigmas, ac = spaced_sigmas(cfg, steps, round_karras_timesteps=True)
    log_table = np.log(S.sigma_table(ac))
    ends = sigmas[:-1]  # s_0 .. s_{N-1}
    if ancestral:
        _, sigma_down = ancestral_sigmas(ends[:-1], sigmas[1:-1])
        mids = _geometric_mean(ends[:-1], sigma_down)  # between s_k and sigma_down_k
    else:
        mids = _geometric_mean(sigmas[1:-1], ends[:-1])  # between s_{k+1} and s_k
    mid_ts = S.sigma_to_t(mids, log_table, float32=True).astype(ts.dtype)
    evaluation_sigmas = np.concatenate([_interleave(ends, mids), [0.0]]).astype(F32)
    return Schedule(_interleave(ts, mid_ts), evaluation_sigmas, init_sigma(cfg, sigmas), 2, steps, ac, F32(1.0))


def _kdpm2_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state, rng, ancestral: bool):
    """First evaluation of a step (state None): Euler to the midpoint, keeping x. Second: the
    step from the kept x with the midpoint's slope (ancestral: to sigma_down, plus noise)."""
    if state is None:
        sigma, sigma_mid = sch.sigmas[i], sch.sigmas[i + 1]
        d = (x - x0_from_sigma(cfg["prediction_type"], out, x, sigma)) / sigma
        return x + d * (sigma_mid - sigma), x
    sigma, sigma_mid, sigma_next = sch.sigmas[i - 1], sch.sigmas[i], sch.sigmas[i + 1]
    d = (x - x0_from_sigma(cfg["prediction_type"], out, x, sigma_mid)) / sigma_mid
    if not ancestral:
        return state + d * (sigma_next - sigma), None
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    return state + d * (sigma_down - sigma) + draw_noise(rng, x.shape) * sigma_up, None


def kdpm2_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state, rng: None):
    return _kdpm2_step(cfg, sch, i, out, x, state, rng, ancestral=False)


def kdpm2_ancestral_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state, rng):
    return _kdpm2_step(cfg, sch, i, out, x, state, rng, ancestral=True)


KDPM2 = Sampler(
    class_name="KDPM2DiscreteScheduler",
    defaults=_DEFAULTS,
    allowed=_ALLOWED,
    schedule=lambda cfg, steps: _schedule(cfg, steps, ancestral=False),
    scale_input=karras_input,
    step=kdpm2_step,
    add_noise=add_noise_sigma,
)

KDPM2_ANCESTRAL = KDPM2._replace(
    class_name="KDPM2AncestralDiscreteScheduler",
    schedule=lambda cfg, steps: _schedule(cfg, steps, ancestral=True),
    step=kdpm2_ancestral_step,
    stochastic=True,
)
