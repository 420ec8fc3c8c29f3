"""DDIM (Song et al. 2020; deterministic at eta 0) and DDPM (Ho et al. 2020) ancestral sampling."""

from __future__ import annotations

import numpy as np

from sdport.runtime.schedulers import schedules as S
from sdport.runtime.schedulers.sampler import (
    Sampler,
    add_noise_alpha_bar,
    clip_x0,
    draw_noise,
    identity_input,
    x0_from_alpha_bar,
)
from sdport.runtime.schedulers.schedules import F32, LINEAR_BETAS, Config, Schedule

_COMMON = {
    **LINEAR_BETAS,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "thresholding": False,
}
_ALLOWED = {"thresholding": (False,), "prediction_type": ("epsilon", "v_prediction", "sample")}


def _schedule(cfg: Config, steps: int) -> Schedule:
    """Integer timesteps over the alpha_bar table; the model input is not scaled."""
    ac = S.alphas_cumprod(cfg)
    ts = S.spaced_timesteps(cfg["timestep_spacing"], steps, cfg["num_train_timesteps"], cfg["steps_offset"])
    final = S.final_alpha_cumprod(cfg, ac) if "set_alpha_to_one" in cfg else F32(1.0)
    return Schedule(ts.round().astype(np.int64), None, 1.0, 1, steps, ac, final)


def ddim_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: None, rng):
    """x_{t-1} = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - s^2) eps + s z   (DDIM eq. 12),
    s = eta sqrt(beta~_t) the posterior's deviation scaled by eta; z is drawn only where eta > 0."""
    t = int(sch.timesteps[i])
    t_prev = t - cfg["num_train_timesteps"] // sch.steps  # diffusers' rule, whatever the spacing
    # 1. alpha_bar at t and t_prev
    alpha_bar = sch.alphas_cumprod[t]
    alpha_bar_prev = sch.alphas_cumprod[t_prev] if t_prev >= 0 else sch.final_alpha_cumprod
    beta_bar = 1 - alpha_bar
    # 2. predicted x0 and eps
    prediction = cfg["prediction_type"]
    x0 = x0_from_alpha_bar(prediction, out, x, alpha_bar)
    if prediction == "epsilon":
        eps = out
    elif prediction == "v_prediction":
        eps = np.sqrt(alpha_bar) * out + np.sqrt(beta_bar) * x
    else:
        eps = (x - np.sqrt(alpha_bar) * x0) / np.sqrt(beta_bar)
    x0 = clip_x0(cfg, x0)
    # 3. the noise's deviation, "direction pointing to x_t" and the step
    eta = cfg["eta"]
    variance = (1 - alpha_bar_prev) / beta_bar * (1 - alpha_bar / alpha_bar_prev)
    deviation = F32(eta) * np.sqrt(variance)
    direction = np.sqrt(1 - alpha_bar_prev - deviation * deviation) * eps
    x_prev = np.sqrt(alpha_bar_prev) * x0 + direction
    if eta > 0:
        x_prev = x_prev + deviation * draw_noise(rng, x.shape)
    return x_prev, None


def ddpm_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: None, rng):
    """Posterior mean of q(x_{t-1} | x_t, x0) (DDPM eq. 7) plus sigma_t z, z drawn when t > 0."""
    t = int(sch.timesteps[i])
    t_prev = int(sch.timesteps[i + 1]) if i + 1 < len(sch.timesteps) else -1
    # 1. alphas and betas
    alpha_bar = sch.alphas_cumprod[t]
    alpha_bar_prev = sch.alphas_cumprod[t_prev] if t_prev >= 0 else F32(1.0)
    beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
    alpha_t = alpha_bar / alpha_bar_prev
    beta_t = 1 - alpha_t
    # 2. predicted x0
    x0 = clip_x0(cfg, x0_from_alpha_bar(cfg["prediction_type"], out, x, alpha_bar))
    # 3. posterior mean mu_t(x_t, x0)
    x0_coeff = np.sqrt(alpha_bar_prev) * beta_t / beta_bar
    xt_coeff = np.sqrt(alpha_t) * beta_bar_prev / beta_bar
    x_prev = x0_coeff * x0 + xt_coeff * x
    # 4. add sigma_t z
    if t > 0:
        z = draw_noise(rng, x.shape)
        if cfg["variance_type"] == "fixed_large":
            variance = beta_t
        else:  # fixed_small: the posterior variance beta~_t
            variance = np.maximum((1 - alpha_bar_prev) / (1 - alpha_bar) * beta_t, F32(1e-20))
        x_prev = x_prev + np.sqrt(variance) * z
    return x_prev, None


DDIM = Sampler(
    class_name="DDIMScheduler",
    # eta is no config key of diffusers' but the argument of its step(), which the pipeline passes
    # from the request; here it is read from the config like the rest (schedulers.with_eta).
    defaults={**_COMMON, "set_alpha_to_one": True, "eta": 0.0},
    allowed=_ALLOWED,
    schedule=_schedule,
    scale_input=identity_input,
    step=ddim_step,
    add_noise=add_noise_alpha_bar,
)

DDPM = Sampler(
    class_name="DDPMScheduler",
    defaults={**_COMMON, "variance_type": "fixed_small"},
    allowed={**_ALLOWED, "variance_type": ("fixed_small", "fixed_large")},
    schedule=_schedule,
    scale_input=identity_input,
    step=ddpm_step,
    add_noise=add_noise_alpha_bar,
    stochastic=True,
)
