"""Scheduler parity: every sdport scheduler against its diffusers 0.42 class, whole loops.

The same deterministic model and the same starting noise go through diffusers' pipeline loop
(torch, float32) and through `sdport.runtime.schedulers.denoise`; the final latents are compared
with `assert_allclose(rtol=RTOL, atol=ATOL)`. Stochastic schedulers get the same noise on both
sides: diffusers' `randn_tensor` (as imported by each scheduler module) is patched to read the
same tape of float32 standard normals our fake rng reads.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (  # noqa: E402
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_k_dpm_2_ancestral_discrete,
    scheduling_lcm,
    scheduling_lms_discrete,
)
from diffusers import LMSDiscreteScheduler  # noqa: E402  (needs scipy, in the test extra)

from sdport.errors import UsageError  # noqa: E402
from sdport.models.families import scheduler_config  # noqa: E402
from sdport.runtime.schedulers import add_noise, available, denoise, name_for_config, schedule, with_eta  # noqa: E402
from sdport.runtime.schedulers.k_samplers import lms_coefficient  # noqa: E402


# Both sides round in float32, but not identically: torch's float32 sqrt (MKL) is not
# correctly rounded (it differs from NumPy's in the last bit for ~17% of inputs), so sigma and
# alpha_bar tables can differ by one ulp. Steps that compute (x - x0) / sigma at small sigma
# amplify that to ~1e-5 of the largest |x|, hence an atol relative to the array's scale.
RTOL = 1e-5
ATOL = 1e-5  # times max(1, max |x|)


def assert_close(ours: np.ndarray, ref: np.ndarray, atol: float = ATOL) -> None:
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=atol * max(1.0, float(np.abs(ref).max())))

SD15 = scheduler_config("sd1")  # the v1-5 scheduler config sdport ships

# name -> (diffusers class, config keys the name itself fixes)
REFERENCE = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
NAMES = tuple(REFERENCE)
KARRAS = ("lms", "euler", "heun", "dpm2", "dpm2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s", "unipc", "deis")  # diffusers offers Karras
STOCHASTIC = ("ddpm", "euler_ancestral", "dpm2_ancestral", "dpmpp_2m_sde", "lcm")
NOISE_MODULES = (
    scheduling_ddim,  # with eta > 0
    scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_k_dpm_2_ancestral_discrete,
    scheduling_dpmsolver_multistep, scheduling_lcm,
)
SHAPE = (1, 4, 8, 8)


def model_fn(x: np.ndarray, t: float) -> np.ndarray:
    """A fixed nonlinear stand-in for the UNet: outputs of unit-ish magnitude, depending on t."""
    x64 = x.astype(np.float64)
    return (np.tanh(x64) * (0.6 + 0.3 * t / 1000) + 0.05 * np.sin(3 * x64 + t / 100)).astype(np.float32)


def start_noise(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# --- noise injection -----------------------------------------------------------------------


class TapeRng:
    """Stands in for np.random.Generator: records calls, returns a seeded tape of float32 normals."""

    def __init__(self, seed: int):
        self.gen = np.random.default_rng(seed)
        self.calls: list[tuple] = []

    def standard_normal(self, size, dtype=np.float64):
        self.calls.append((tuple(size), dtype))
        return self.gen.standard_normal(size, dtype=np.float32)


@contextlib.contextmanager
def diffusers_noise(seed: int):
    """Patch `randn_tensor` in each stochastic scheduler module to read the same tape."""
    gen = np.random.default_rng(seed)
    calls = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        calls.append(tuple(shape))
        return torch.from_numpy(gen.standard_normal(tuple(shape), dtype=np.float32))

    saved = [(m, m.randn_tensor) for m in NOISE_MODULES]
    for m in NOISE_MODULES:
        m.randn_tensor = randn_tensor
    try:
        yield calls
    finally:
        for m, fn in saved:
            m.randn_tensor = fn


# --- the diffusers reference loop ----------------------------------------------------------


@lru_cache(maxsize=None)
def _base_scheduler(name: str, config_json: str):
    cls, fixed = REFERENCE[name]
    return cls.from_config({**json.loads(config_json), **fixed})


def reference_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler (deep copy of a cached one: construction is the slow part)."""
    return copy.deepcopy(_base_scheduler(name, json.dumps(config, sort_keys=True)))


def run_reference(name, config, latents, steps, *, seed=0, start_step=0, original=None, noise=None):
    """StableDiffusion(Img2Img)Pipeline's scheduler use, verbatim; returns (x, model calls)."""
    sched = reference_scheduler(name, config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    kwargs = {"generator": None} if "generator" in inspect.signature(sched.step).parameters else {}
    calls = 0
    with diffusers_noise(seed) as draws:
        if start_step:
            first = start_step * sched.order
            timesteps = timesteps[first:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(first)
            x = sched.add_noise(torch.from_numpy(original), torch.from_numpy(noise), timesteps[:1])
        else:
            x = torch.from_numpy(latents) * sched.init_noise_sigma
        for t in timesteps:
            x_in = sched.scale_model_input(x, t)
            out = torch.from_numpy(model_fn(x_in.numpy(), float(t)))
            calls += 1
            x = sched.step(out, t, x, **kwargs).prev_sample
    return x.numpy(), calls, len(draws)


def run_ours(name, config, latents, steps, *, seed=0, start_step=0):
    rng = TapeRng(seed)
    calls = []

    def model(x, t):
        calls.append(t)
        return model_fn(x, t)

    x = denoise(name, config, model, latents, steps, rng=rng, start_step=start_step)
    return x, len(calls), rng


def assert_parity(name, config, steps, *, seed=0, atol=ATOL):
    latents = start_noise()
    ref, ref_calls, ref_draws = run_reference(name, config, latents, steps, seed=seed)
    ours, our_calls, rng = run_ours(name, config, latents, steps, seed=seed)
    assert our_calls == ref_calls
    assert len(rng.calls) == ref_draws
    assert all(c == (SHAPE, np.float32) for c in rng.calls)
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    assert_close(ours, ref, atol)


# --- the grid ------------------------------------------------------------------------------


def _grid():
    for name in NAMES:
        # LCM's timesteps ignore timestep_spacing (in diffusers too): one spacing is enough.
        spacings = ("leading",) if name == "lcm" else ("leading", "trailing", "linspace")
        for prediction in ("epsilon", "v_prediction"):
            for spacing in spacings:
                for karras in (False, True) if name in KARRAS else (False,):
                    for steps in (1, 2, 3, 10, 25, 50):
                        tag = f"{name}-{prediction}-{spacing}{'-karras' if karras else ''}-{steps}"
                        yield pytest.param(name, prediction, spacing, karras, steps, id=tag)


@pytest.mark.parametrize("name, prediction, spacing, karras, steps", list(_grid()))
def test_matches_diffusers(name, prediction, spacing, karras, steps):
    config = {**SD15, "prediction_type": prediction, "timestep_spacing": spacing, "use_karras_sigmas": karras}
    assert_parity(name, config, steps, atol=ANCESTRAL_DPM2_ATOL if (name, spacing, steps) == ("dpm2_ancestral", "linspace", 2) else ATOL)


VARIANTS = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "squaredcos": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": list(np.linspace(0.0002, 0.015, 1000) ** 1.1)},
    "zero_snr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "alpha_to_one": {"set_alpha_to_one": True},
    "clip": {"clip_sample": True, "clip_sample_range": 0.5},
    "sample": {"prediction_type": "sample"},
    "offset0": {"steps_offset": 0},
    "train500": {"num_train_timesteps": 500},
}
# DPM2 ancestral's sigma_down = sqrt(s_next^2 - sigma_up^2) cancels where s_next << s (2 linspace
# steps: 14.6 -> 0.029; the cosine schedule's first steps): one ulp of torch's float32 sqrt,
# which is not correctly rounded, moves sigma_down by 1-2% there, and the image by up to 7.8e-4
# (2 steps) or 1.6e-4 of its range (cosine). The steps themselves agree wherever it is not so.
ANCESTRAL_DPM2_ATOL = 1e-3

# diffusers itself raises NotImplementedError for prediction_type "sample" in these.
NO_SAMPLE = ("pndm", "euler_ancestral", "dpm2", "dpm2_ancestral")


def _variant_grid():
    for variant in VARIANTS:
        for name in NAMES:
            if variant == "sample" and name in NO_SAMPLE:
                continue
            for steps in (3, 20):
                yield pytest.param(variant, name, steps, id=f"{variant}-{name}-{steps}")


@pytest.mark.parametrize("variant, name, steps", list(_variant_grid()))
def test_config_variants(variant, name, steps):
    """Each key that changes the numbers; classes that do not accept a key ignore it."""
    # Zero terminal SNR puts sigma_max at 4096: the first Euler step cancels x of magnitude
    # ~1e4 down to ~10, so one-ulp differences at 4096 (~5e-4) stay visible in the output.
    atol = 5e-4 if variant == "zero_snr" and name in ("euler", "euler_ancestral") else ATOL
    if variant == "squaredcos" and name == "dpm2_ancestral":
        atol = ANCESTRAL_DPM2_ATOL
        if steps == 3:  # sigma_down 0 at the first step: a NaN midpoint, in diffusers too (test_plans)
            assert np.isnan(schedule(name, {**SD15, **VARIANTS[variant]}, steps).sigmas[1])
    assert_parity(name, {**SD15, **VARIANTS[variant]}, steps, atol=atol)


CLASS_SPECIFIC = [
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0}),
    ("unipc", {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0}),
    ("dpmpp_2m", {"solver_type": "heun"}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_2m", {"lambda_min_clipped": -5.1}),
    ("dpmpp_2s", {"lambda_min_clipped": -5.1}),
    ("dpmpp_2s", {"solver_type": "heun"}),
    ("dpmpp_2s", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_2s", {"final_sigmas_type": "sigma_min", "lower_order_final": True, "use_karras_sigmas": True}),
    ("unipc", {"solver_order": 3}),
    ("deis", {"solver_order": 3}),
    ("deis", {"solver_order": 1}),
    ("deis", {"solver_order": 3, "lower_order_final": False}),
    # Not here, because diffusers itself fails on them: dpmpp_2m Karras on squaredcos_cap_v2
    # (test_dpm_karras_cosine_schedule); unipc solver_order 3 with lower_order_final False (its
    # last step solves a singular system and raises); unipc bh1 (its last step computes
    # -inf * 0 = nan: test_unipc_bh1_until_the_last_step).
    ("unipc", {"disable_corrector": [0, 2]}),
    ("unipc", {"solver_type": "midpoint"}),  # a DPM-Solver config: diffusers maps it to bh2
    ("ddpm", {"variance_type": "fixed_large"}),
    ("lcm", {"original_inference_steps": 30, "timestep_scaling": 5.0}),
    ("heun", {"clip_sample": True, "prediction_type": "sample"}),
]


@pytest.mark.parametrize("name, extra", CLASS_SPECIFIC, ids=lambda v: v if isinstance(v, str) else "-".join(v))
@pytest.mark.parametrize("steps", (4, 15))
def test_class_specific_keys(name, extra, steps):
    assert_parity(name, {**SD15, **extra}, steps)


@pytest.mark.parametrize("eta", (0.3, 1.0))
@pytest.mark.parametrize("prediction", ("epsilon", "v_prediction"))
def test_ddim_eta_matches_diffusers(eta, prediction):
    """DDIM's eta, which diffusers takes in step(): a noise draw every step, deviation eta sigma_t."""
    config = {**SD15, "prediction_type": prediction}
    sched = reference_scheduler("ddim", config)
    sched.set_timesteps(12)
    x = torch.from_numpy(start_noise())
    with diffusers_noise(4) as draws:
        for t in sched.timesteps:
            x = sched.step(torch.from_numpy(model_fn(x.numpy(), float(t))), t, x, eta=eta).prev_sample
    rng = TapeRng(4)
    ours = denoise("ddim", with_eta("ddim", config, eta), model_fn, start_noise(), 12, rng=rng)
    assert len(rng.calls) == len(draws) == 12
    assert_close(ours, x.numpy())
    assert np.abs(ours - denoise("ddim", config, model_fn, start_noise(), 12)).max() > 0.01


def test_dpm_karras_cosine_schedule():
    """Karras sigmas on the cosine schedule truncate timesteps (diffusers does not round them);
    the first two then coincide and diffusers' own step loop overruns its sigmas (IndexError),
    so only the schedule is compared."""
    config = {**SD15, "use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}
    for steps in (4, 15):
        sched = reference_scheduler("dpmpp_2m", config)
        sched.set_timesteps(steps)
        ours = schedule("dpmpp_2m", config, steps)
        np.testing.assert_array_equal(ours.timesteps, sched.timesteps.numpy())
        np.testing.assert_allclose(ours.sigmas, sched.sigmas.numpy(), rtol=1e-6)


def test_unipc_bh1_until_the_last_step():
    """bh1 matches up to the last step, where diffusers multiplies B(h) = -inf by a zero
    correction and returns nan; sdport skips the empty correction and stays finite."""
    config = {**SD15, "solver_type": "bh1"}
    steps = 12
    sched = reference_scheduler("unipc", config)
    sched.set_timesteps(steps)
    x = torch.from_numpy(start_noise())
    for t in sched.timesteps[:-1]:
        x = sched.step(torch.from_numpy(model_fn(x.numpy(), float(t))), t, x).prev_sample
    seen = []
    final = denoise("unipc", config, model_fn, start_noise(), steps, callback=lambda i, n, x: seen.append(x))
    assert_close(seen[-2], x.numpy())
    assert np.isfinite(final).all()


def test_switching_from_a_dpm_solver_config():
    """A DPMSolverMultistepScheduler folder config drives every other scheduler as from_config does."""
    dpm = {
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "use_karras_sigmas": True,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "thresholding": False,
        "lambda_min_clipped": -float("inf"),
    }
    for name in NAMES:
        assert_parity(name, dpm, 7)


# --- image to image ------------------------------------------------------------------------


@pytest.mark.parametrize("strength", (0.3, 0.75))
@pytest.mark.parametrize("name", NAMES)
def test_img2img_matches_diffusers(name, strength):
    steps = 10
    start = steps - int(steps * strength)
    config = {**SD15, "use_karras_sigmas": name in ("euler", "dpmpp_2m")}
    original, noise = start_noise(1), start_noise(2)
    noised = add_noise(name, config, original, noise, steps, start)
    ref, ref_calls, ref_draws = run_reference(name, config, None, steps, start_step=start, original=original, noise=noise)
    rng = TapeRng(0)
    calls = []
    ours = denoise(name, config, lambda x, t: calls.append(t) or model_fn(x, t), noised, steps, rng=rng, start_step=start)
    assert (len(calls), len(rng.calls)) == (ref_calls, ref_draws)
    assert_close(ours, ref)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_diffusers(name):
    steps, start = 12, 5
    original, noise = start_noise(1), start_noise(2)
    sched = reference_scheduler(name, SD15)
    sched.set_timesteps(steps)
    first = start * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(first)
    ref = sched.add_noise(torch.from_numpy(original), torch.from_numpy(noise), sched.timesteps[first : first + 1])
    np.testing.assert_allclose(add_noise(name, SD15, original, noise, steps, start), ref.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("karras", [False, True])
def test_lms_coefficients_match_diffusers_quadrature(karras):
    """Every LMS coefficient of a schedule against diffusers' own, over diffusers' sigmas (its
    float32 table can differ from sdport's by an ulp; see RTOL). diffusers integrates with scipy
    quad but evaluates the integrand in float32 torch, hence rel=1e-6."""
    sched = reference_scheduler("lms", {**SD15, "use_karras_sigmas": karras})
    sched.set_timesteps(30)
    sigmas = sched.sigmas.numpy()
    for i in range(30):
        order = min(i + 1, 4)
        for j in range(order):
            ref = sched.get_lms_coefficient(order, i, j)
            assert lms_coefficient(sigmas, order, i, j) == pytest.approx(ref, rel=1e-6, abs=1e-9), (i, j)


# --- randomness ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeds(name):
    latents = start_noise()

    def run(seed):
        return denoise(name, SD15, model_fn, latents, 8, rng=np.random.default_rng(seed))

    np.testing.assert_array_equal(run(7), run(7))
    assert np.abs(run(7) - run(8)).max() > 1e-3
    with pytest.raises(UsageError, match="rng"):
        denoise(name, SD15, model_fn, latents, 8)


# --- contract over every name --------------------------------------------------------------


@pytest.mark.parametrize("name", available())
def test_contract(name):
    """Shapes, dtype, finiteness, model calls and timesteps as diffusers makes them."""
    assert set(available()) == set(NAMES)
    latents = start_noise(3, (2, 4, 4, 6))
    for steps in (1, 5, 20):
        seen = []
        progress = []
        x = denoise(
            name,
            SD15,
            lambda x, t: seen.append((x.shape, x.dtype, type(t))) or model_fn(x, t),
            latents,
            steps,
            rng=np.random.default_rng(0),
            callback=lambda i, total, x: progress.append((i, total)),
        )
        assert x.shape == latents.shape and x.dtype == np.float32 and np.isfinite(x).all()
        sched = reference_scheduler(name, SD15)
        sched.set_timesteps(steps)
        # pndm repeats one timestep (N + 1 evaluations) unless N == 1
        two = 2 * steps - 1
        expected_calls = {"heun": two, "dpm2": two, "dpm2_ancestral": two, "pndm": steps + (steps > 1)}.get(name, steps)
        assert len(seen) == len(sched.timesteps) == expected_calls
        assert all(s == (latents.shape, np.float32, float) for s in seen)
        assert progress == [(i, expected_calls) for i in range(expected_calls)]
        ours = schedule(name, SD15, steps)
        if name in ("dpm2", "dpm2_ancestral"):
            # their midpoints' timesteps come from float32 log, exp (and sqrt): an ulp apart
            np.testing.assert_allclose(ours.timesteps, sched.timesteps.numpy(), rtol=1e-6, atol=1e-5)
        else:
            np.testing.assert_array_equal(ours.timesteps, sched.timesteps.numpy())
        assert float(ours.init_noise_sigma) == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)
        if ours.sigmas is not None:
            # DPM2's midpoints: float32 log and exp on both sides, not the same implementations
            rtol = 1e-5 if name in ("dpm2", "dpm2_ancestral") else 1e-6
            np.testing.assert_allclose(ours.sigmas, reference_sigmas(name, sched), rtol=rtol)


def reference_sigmas(name: str, sched) -> np.ndarray:
    """diffusers' sigmas as sdport's Schedule lists them: for DPM2, the sigma each evaluation's
    input is scaled by (an end sigma, then a midpoint), then 0."""
    if name not in ("dpm2", "dpm2_ancestral"):
        return sched.sigmas.numpy()
    count = len(sched.timesteps)
    mids = sched.sigmas_interpol.numpy()[np.arange(1, count, 2) - (name == "dpm2_ancestral")]
    ends = sched.sigmas.numpy()[0:count:2]
    out = np.zeros(count + 1, dtype=np.float32)
    out[0:count:2], out[1:count:2] = ends, mids
    return out


@pytest.mark.parametrize("name", available())
def test_schedules_are_shared_by_config_value_and_read_only(name):
    """A schedule is made once per (name, config values, steps): the same values in another dict
    share it, a config edited in place gets its own (as diffusers computes it), and the shared
    arrays can't be written through."""
    config = dict(SD15)
    first = schedule(name, config, 10)
    assert schedule(name, dict(SD15), 10) is first
    config["beta_end"] = 0.015
    edited = schedule(name, config, 10)
    assert edited is not first
    np.testing.assert_allclose(edited.alphas_cumprod, reference_scheduler(name, config).alphas_cumprod.numpy(), rtol=1e-6)
    assert not np.allclose(edited.alphas_cumprod, first.alphas_cumprod)
    with pytest.raises(ValueError, match="read-only"):
        first.timesteps[0] = 0
    with pytest.raises(ValueError, match="read-only"):
        first.alphas_cumprod[0] = 0


def test_unknown_name_lists_known_ones():
    with pytest.raises(UsageError) as err:
        denoise("k_euler", SD15, model_fn, start_noise(), 5)
    assert isinstance(err.value, ValueError)
    for name in NAMES:
        assert name in str(err.value)


def test_unsupported_config_values_are_refused():
    with pytest.raises(UsageError, match="skip_prk_steps"):
        schedule("pndm", {**SD15, "skip_prk_steps": False}, 10)
    with pytest.raises(UsageError, match="thresholding"):
        schedule("ddim", {**SD15, "thresholding": True}, 10)
    with pytest.raises(UsageError, match="prediction_type"):
        schedule("euler_ancestral", {**SD15, "prediction_type": "sample"}, 10)
    with pytest.raises(UsageError, match="original_inference_steps"):
        schedule("lcm", SD15, 60)


def test_name_for_config():
    assert name_for_config(SD15) == "pndm"
    assert name_for_config({"_class_name": "DPMSolverMultistepScheduler"}) == "dpmpp_2m"
    assert name_for_config({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}) == "dpmpp_2m_sde"
    assert name_for_config({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}) is None
    assert name_for_config({"_class_name": "TCDScheduler"}) is None
    for name, (cls, fixed) in REFERENCE.items():
        assert name_for_config({"_class_name": cls.__name__, **fixed}) == name


def test_schedulers_never_import_torch():
    code = (
        "import sys, numpy as np\n"
        "from sdport.runtime.schedulers import denoise, available\n"
        "for n in available():\n"
        "    denoise(n, {}, lambda x, t: x, np.zeros((1, 4, 2, 2), np.float32), 2, rng=np.random.default_rng(0))\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'scipy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
