"""The compiled loop (linear_loop.py) equals `denoise` with guidance in NumPy, for every scheduler.

The reference is the pipeline's other path: the scheduler's step functions (held to diffusers by
test_schedulers.py) on the guided output uncond + g (text - uncond), in float32. The compiled
loop folds the guidance into each step's coefficients and sums in float64, so the two differ by
float32 rounding. Stochastic schedulers get the same `PortableNoise` on both sides: the draws,
their shapes and the timesteps must line up too. Whole images against diffusers, through this
loop, are test_pipeline.py's.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdport.errors import UsageError
from sdport.models.families import scheduler_config
from sdport.runtime import linear_loop
from sdport.runtime.noise import PortableNoise
from sdport.runtime.schedulers import available, denoise, schedule
from test_plans import CountingNoise, scheduler_grid

SD15 = scheduler_config("sd1")
SHAPE = (2, 4, 8, 8)  # two images: each row of the loop's history holds the whole batch
GUIDANCE = 7.5
ATOL = 1e-5  # of max(1, max |x|); measured at most 7.3e-6 over the grid but in the case named below


def unet(sample: np.ndarray, t: float, guided: bool) -> np.ndarray:
    """A nonlinear stand-in; guided, a batch [x, x] whose text half's output differs from its
    unconditional half's, as a UNet's."""
    x = sample.astype(np.float64)
    out = np.tanh(x) * (0.6 + 0.3 * t / 1000)
    if guided:
        out[len(x) // 2 :] += 0.05 * np.sin(3 * x[len(x) // 2 :] + t / 100)
    return out.astype(np.float32)


def assert_loop_matches(name: str, config: dict, steps: int, start_step: int = 0, guided: bool = True,
                        atol: float = ATOL) -> linear_loop.CompiledPlan:
    latents = PortableNoise(0).standard_normal(SHAPE)
    ref_times, our_times = [], []
    ref_rng, our_rng = CountingNoise(7), CountingNoise(7)

    def guided_model(x, t):
        ref_times.append(t)
        if not guided:
            return unet(x, t, False)
        out = unet(np.concatenate([x, x]), t, True)
        uncond, text = out[: len(x)], out[len(x) :]
        return uncond + GUIDANCE * (text - uncond)

    ref = denoise(name, config, guided_model, latents, steps, rng=ref_rng, start_step=start_step)
    plan = linear_loop.compile_plan(name, config, steps, start_step, GUIDANCE if guided else None)
    assert plan is not None, f"{name} with {steps} steps did not compile ({linear_loop.MAX_SLOTS} rows at most)"
    seen = []

    def raw_unet(sample, k):
        assert sample.shape == (len(latents) * plan.copies, *SHAPE[1:]) and sample.dtype == np.float32
        our_times.append(plan.steps[k].timestep)
        return unet(sample, plan.steps[k].timestep, guided)

    ours = linear_loop.run(plan, latents, raw_unet, our_rng, lambda k, total, x: seen.append((k, total, x.copy())))
    assert our_times == ref_times  # the same timesteps, in order
    assert our_rng.shapes == ref_rng.shapes  # the same draws: the noise streams line up
    assert [k for k, _, _ in seen] == list(range(len(our_times))) and all(t == len(our_times) for _, t, _ in seen)
    np.testing.assert_array_equal(seen[-1][2], ours)
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=atol * max(1.0, float(np.abs(ref).max())))
    return plan


def _cancels(name: str, spacing: str, steps: int) -> bool:
    """DPM2 ancestral's sigma_down = sqrt(s_next^2 - sigma_up^2) cancels at 2 linspace steps: an
    ulp of float32 there moves it 1-2% (test_schedulers.py); measured 2.2e-5 of max |x| here."""
    return name == "dpm2_ancestral" and spacing == "linspace" and steps == 2


@pytest.mark.parametrize("name, prediction, spacing, karras", list(scheduler_grid()))
def test_loop_equals_denoise(name, prediction, spacing, karras):
    config = {**SD15, "prediction_type": prediction, "timestep_spacing": spacing, "use_karras_sigmas": karras}
    for steps in (1, 2, 3, 10, 25, 50):
        for start_step in sorted({0, steps // 2}):
            atol = 1e-3 if _cancels(name, spacing, steps) else ATOL
            assert_loop_matches(name, config, steps, start_step, atol=atol)
        assert_loop_matches(name, config, steps, guided=False, atol=1e-3 if _cancels(name, spacing, steps) else ATOL)


def test_rows_stay_few_at_50_steps():
    """The history the loop keeps: a handful of latents, not one per step."""
    rows = {name: linear_loop.compile_plan(name, SD15, 50, 0, GUIDANCE) for name in available()}
    assert all(plan is not None and plan.slots <= (12 if name == "unipc" else 9) for name, plan in rows.items()), {
        name: plan and plan.slots for name, plan in rows.items()}
    # Only UniPC keeps a tensor of its own (its corrected sample), and only where its rows grow.
    assert {name for name, plan in rows.items() if any(step.derived for step in plan.steps)} == {"unipc"}
    assert not any(step.derived for step in linear_loop.compile_plan("unipc", SD15, 5, 0, GUIDANCE).steps)


def test_unipc_keeps_its_corrected_sample():
    """Its rows would read every earlier tensor (147 rows at 50 steps); kept as a tensor of its
    own, 12 rows at any step count, and the result is still denoise's."""
    for steps in (7, 12, 50):
        plan = assert_loop_matches("unipc", SD15, steps)
        assert plan.slots == 12 and sum(len(step.derived) for step in plan.steps) == len(plan.steps) - 2
    for extra in ({"solver_order": 3}, {"disable_corrector": [0, 2]}, {"solver_type": "bh1"},
                  {"prediction_type": "v_prediction", "use_karras_sigmas": True}):
        assert_loop_matches("unipc", {**SD15, **extra}, 20)


def test_nonlinear_configs_are_not_compiled():
    assert linear_loop.compile_plan("ddim", {**SD15, "clip_sample": True}, 10, 0, GUIDANCE) is None
    assert linear_loop.compile_plan("ddim", {**SD15, "thresholding": True}, 10, 0, GUIDANCE) is None


def test_ddim_eta_draws_as_denoise():
    plan = assert_loop_matches("ddim", {**SD15, "eta": 0.6}, 12)
    assert all(step.draws for step in plan.steps[:-1])


def test_errors_are_denoise_errors():
    with pytest.raises(UsageError, match="steps must be a positive integer"):
        linear_loop.compile_plan("euler", SD15, 0, 0, GUIDANCE)
    with pytest.raises(UsageError, match="start_step must be in"):
        linear_loop.compile_plan("euler", SD15, 10, 11, GUIDANCE)
    with pytest.raises(UsageError, match="unknown scheduler"):
        linear_loop.compile_plan("nope", SD15, 10, 0, GUIDANCE)
    plan = linear_loop.compile_plan("euler_ancestral", SD15, 4, 0, GUIDANCE)
    with pytest.raises(UsageError, match="this run draws noise: pass rng"):
        linear_loop.run(plan, np.zeros(SHAPE, np.float32), lambda sample, k: sample, None, lambda *args: None)
    with pytest.raises(UsageError, match=r"returned shape \(1, 4, 8, 8\) for input \(4, 4, 8, 8\)"):
        linear_loop.run(plan, np.zeros(SHAPE, np.float32), lambda sample, k: sample[:1], PortableNoise(0),
                        lambda *args: None)


@pytest.mark.parametrize("bad, in_output", [(np.nan, True), (np.inf, True), (3e38, False)])
def test_non_finite_latents_stop_the_loop_at_their_step(bad, in_output):
    """NaN or inf in x_k+1 stops the loop after evaluation k, saying whether the model's output had
    them too (halves of -3e38 and 3e38 are finite, but their guided sum, 14 x 3e38, is not)."""
    plan = linear_loop.compile_plan("euler", SD15, 6, 0, GUIDANCE)
    loop = linear_loop.Loop(plan, SHAPE)
    seen = []

    def model(k):
        out = np.full(loop.unet_input.shape, bad if k == 2 else 0.1, np.float32)
        out[: len(out) // 2] *= -1  # the unconditional half
        return out

    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(linear_loop.NotFinite) as caught:
        loop.run(PortableNoise(0).standard_normal(SHAPE), model, None, lambda k, total, x: seen.append(k))
    assert (caught.value.k, caught.value.in_output) == (2, in_output)
    assert seen == [0, 1]
    with pytest.raises(UsageError, match=r"latents of shape \(1, 4, 8, 8\) for a loop made for \(2, 4, 8, 8\)"):
        loop.run(np.zeros((1, 4, 8, 8), np.float32), model, None)


def test_compiled_plans_are_reused():
    first = linear_loop.compile_plan("dpmpp_2m", SD15, 20, 0, GUIDANCE)
    assert linear_loop.compile_plan("dpmpp_2m", dict(SD15), 20, 0, GUIDANCE) is first
    assert linear_loop.compile_plan("dpmpp_2m", SD15, 20, 0, 5.0) is not first
    assert len(first.steps) == len(schedule("dpmpp_2m", SD15, 20).timesteps)


@pytest.mark.parametrize("name", ["pndm", "unipc"])
def test_products_are_made_in_blocks_of_columns(name, monkeypatch):
    """Each BLAS call of a step's product reads at most BLOCK_ELEMENTS of the history (a BLAS runs
    larger products on threads that then spin against the UNet's next run), and the blocks give the
    numbers of one product over all columns, to the bit; UniPC's corrected sample included."""
    shape = (4, 4, 48, 48)  # 36864 latent elements a row: 9 rows for PNDM, 12 for UniPC, 2 blocks
    latents = PortableNoise(0).standard_normal(shape)
    plan = linear_loop.compile_plan(name, SD15, 8, 0, GUIDANCE)

    def model(sample, k):
        return unet(sample, plan.steps[k].timestep, True)

    monkeypatch.setattr(linear_loop, "BLOCK_ELEMENTS", 1 << 40)
    whole = linear_loop.run(plan, latents, model, None)
    monkeypatch.undo()
    products, dot = [], np.dot

    def counted_dot(a, b, out=None):
        if np.ndim(b) == 2:
            products.append(np.size(b))
        return dot(a, b, out=out)

    monkeypatch.setattr(np, "dot", counted_dot)
    blocked = linear_loop.run(plan, latents, model, None)
    monkeypatch.undo()
    assert plan.slots * latents.size > linear_loop.BLOCK_ELEMENTS
    assert max(products) <= linear_loop.BLOCK_ELEMENTS
    assert sum(products) == plan.slots * latents.size * (len(plan.steps) + sum(len(s.derived) for s in plan.steps))
    np.testing.assert_array_equal(blocked, whole)
