"""PNDM's pseudo linear multistep (PLMS) sampler, Liu et al. 2022, as Stable Diffusion ships it.

Only `skip_prk_steps=True` is implemented (every SD checkpoint's config sets it): the first step
is a second-order pseudo-Heun step that evaluates the model twice at the first timestep pair,
then 2-, 3- and 4-step Adams-Bashforth combinations of the past eps. N steps take N + 1
model evaluations.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sdport.runtime.schedulers import schedules as S
from sdport.runtime.schedulers.sampler import Sampler, add_noise_alpha_bar, identity_input
from sdport.runtime.schedulers.schedules import LINEAR_BETAS, Config, Schedule


class PlmsState(NamedTuple):
    """counter: steps taken in this run; ets: the last <= 4 eps; x_first: x before step 0."""

    counter: int = 0
    ets: tuple[np.ndarray, ...] = ()
    x_first: np.ndarray | None = None


def _schedule(cfg: Config, steps: int) -> Schedule:
    """The N spaced timesteps with the second-to-last (in ascending order) repeated: N + 1."""
    ac = S.alphas_cumprod(cfg)
    up = S.spaced_timesteps(cfg["timestep_spacing"], steps, cfg["num_train_timesteps"], cfg["steps_offset"])
    up = up[::-1].round()  # ascending
    ts = np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1].astype(np.int64)
    return Schedule(ts, None, 1.0, 1, steps, ac, S.final_alpha_cumprod(cfg, ac))


def _prev_sample(cfg: Config, sch: Schedule, x: np.ndarray, t: int, t_prev: int, eps: np.ndarray) -> np.ndarray:
    """x_{t_prev} from x_t and eps: PNDM eq. 9, the "transfer" part phi."""
    alpha_bar = sch.alphas_cumprod[t]
    alpha_bar_prev = sch.alphas_cumprod[t_prev] if t_prev >= 0 else sch.final_alpha_cumprod
    beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
    if cfg["prediction_type"] == "v_prediction":
        eps = np.sqrt(alpha_bar) * eps + np.sqrt(beta_bar) * x
    x_coeff = np.sqrt(alpha_bar_prev / alpha_bar)
    eps_denom = alpha_bar * np.sqrt(beta_bar_prev) + np.sqrt(alpha_bar * beta_bar * alpha_bar_prev)
    return x_coeff * x - (alpha_bar_prev - alpha_bar) * eps / eps_denom


def plms_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: PlmsState, rng: None):
    """One PLMS step; eps' is the linear multistep combination of the history."""
    counter, ets, x_first = state
    ratio = cfg["num_train_timesteps"] // sch.steps
    t = int(sch.timesteps[i])
    t_prev = t - ratio
    if counter == 1:  # second evaluation of step 0: redo step 0 from x_first with the mean eps
        t_prev, t = t, t + ratio
    else:
        ets = (*ets[-3:], out)

    if len(ets) == 1 and counter == 0:
        eps = out
        x_first = x
    elif len(ets) == 1 and counter == 1:
        eps = (out + ets[-1]) / 2
        x, x_first = x_first, None
    elif len(ets) == 2:
        eps = (3 * ets[-1] - ets[-2]) / 2
    elif len(ets) == 3:
        eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    else:
        eps = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
    return _prev_sample(cfg, sch, x, t, t_prev, eps), PlmsState(counter + 1, ets, x_first)


PNDM = Sampler(
    class_name="PNDMScheduler",
    defaults={
        **LINEAR_BETAS,
        # diffusers' class default is False (Runge-Kutta warm-up); SD's configs all say True
        # and sdport implements only that, so an absent key means True here.
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    },
    allowed={"skip_prk_steps": (True,), "prediction_type": ("epsilon", "v_prediction")},
    schedule=_schedule,
    scale_input=identity_input,
    step=plms_step,
    add_noise=add_noise_alpha_bar,
    state0=PlmsState(),
)
