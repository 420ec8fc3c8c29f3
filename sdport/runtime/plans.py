"""Sampling plans: any scheduler's run as data, so a host in any language needs one short loop.

    plan = sampling_plan("dpmpp_2m", scheduler_config, steps=25)   # JSON-able dict
    x = run_plan(plan, model, latents, rng=PortableNoise(seed))    # == denoise(...)

For a fixed config and step count, every step of sdport's schedulers is linear in the samples,
the model outputs and the fresh noise seen so far. A plan lists, per model evaluation i:

    x_in  = x_i * input_scale                       # what the model sees
    e_i   = model(x_in, timestep)
    x_i+1 = sum_j a_ij x_j + sum_j b_ij e_j (+ c_i z_i, z_i a fresh standard normal draw)

starting from x_0 = latents * init_noise_sigma; x_S is the result. The coefficients are not
re-derived by hand: `sampling_plan` runs the real step functions once on symbolic values
(one-hot coefficient vectors over x_0..x_S, e_0..e_S-1, z_0..z_S-1), and a step's output
vector is its row of coefficients. docs/CONTRACT.md ("Sampling plans") is the format's spec.

Configs whose steps are not linear (clip_sample, thresholding) get a plan with
`"linear": false` and a `"reason"`, and no evaluations; `run_plan` refuses those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdport.errors import UsageError
from sdport.runtime.schedulers import SAMPLERS, _check_start, _sampler, _setup, draws_noise, resolve_request
from sdport.runtime.schedulers.sampler import NoiseSource

PLAN_VERSION = 1

Model = Callable[[np.ndarray, float], np.ndarray]


def _nonlinear_reason(name: str, config: Mapping[str, Any]) -> str | None:
    """Why this config's steps are not linear in (samples, outputs, noise), or None."""
    defaults = SAMPLERS[name].defaults
    if "thresholding" in defaults and config.get("thresholding", defaults["thresholding"]):
        return "thresholding (dynamic thresholding clips x0 at a per-sample quantile) is not linear"
    if "clip_sample" in defaults and config.get("clip_sample", defaults["clip_sample"]):
        return (
            f"clip_sample (x0 clamped to +-{config.get('clip_sample_range', defaults.get('clip_sample_range', 1.0))}) "
            f"is not linear; set clip_sample false (every Stable Diffusion config does) or use `denoise`"
        )
    return None


class _Draws:
    """A NoiseSource for the symbolic run: each draw is the next noise symbol's one-hot vector."""

    def __init__(self, size: int, first: int) -> None:
        self.size = size
        self.next = first
        self.drawn: list[int] = []

    def standard_normal(self, size: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        v = np.zeros(self.size)
        v[self.next] = 1.0
        self.drawn.append(self.next)
        self.next += 1
        return v


def _terms(row: np.ndarray, first: int, count: int) -> list[list[float]]:
    """[[j, coefficient], ...] for the non-zero entries row[first + j], j < count."""
    part = row[first : first + count]
    return [[int(j), float(part[j])] for j in np.flatnonzero(part)]


@dataclass(frozen=True)
class LinearEvaluation:
    """One model evaluation of a run, over the run's symbols: for S evaluations, x_k is symbol k
    (k = 0..S), e_k symbol S + 1 + k, z_k symbol 2S + 1 + k, and kept tensors from 3S + 1 on."""

    timestep: float
    input_scale: float  # x_in = x_k * input_scale
    row: np.ndarray  # x_k+1's coefficients over the symbols (float64)
    noise: int | None  # the symbol of the draw this step takes, None if it draws nothing
    derived: tuple[tuple[int, np.ndarray], ...] = ()  # (symbol, row): tensors this step makes for later ones


def linear_run(name: str, config: Mapping[str, Any], steps: int, start_step: int = 0,
               keep_terms: int | None = None) -> tuple[float, tuple[LinearEvaluation, ...]] | str:
    """Scheduler `name` (a base name, as `denoise` takes) as linear algebra: (x_0's scale, one
    `LinearEvaluation` per model evaluation), for a run that starts at step `start_step`
    (image-to-image, where x_0 is the noised latents: scale 1); or, for a config whose steps are
    not linear, the reason. UsageError where `denoise` would raise one.

    `keep_terms`: a tensor the scheduler keeps in its state whose row has more terms than this
    becomes a symbol of its own (3S + 1 and on, up to 4 a step), listed as `derived` by the step
    that made it, so that later rows stay short: UniPC's corrected sample otherwise expands into
    every earlier tensor. Plans (`sampling_plan`) keep none: hosts run only their rows."""
    _sampler(name)  # UsageError for an unknown name
    reason = _nonlinear_reason(name, config)
    if reason is not None:
        return f"scheduler {name!r}: {reason}"
    sampler, cfg, sch = _setup(name, config, steps)
    _check_start(name, steps, start_step)
    first = start_step * sch.order
    S = len(sch.timesteps) - first
    size = 3 * S + 1 if keep_terms is None else 7 * S + 1
    e0 = S + 1
    draws = _Draws(size, 2 * S + 1)
    state = sampler.state0
    evaluations = []
    kept = _KeptTensors(3 * S + 1, size, keep_terms)
    for k, i in enumerate(range(first, first + S)):
        x = np.zeros(size)
        x[k] = 1.0
        x_in = sampler.scale_input(sch, i, x)
        out = np.zeros(size)
        out[e0 + k] = 1.0
        before = len(draws.drawn)
        x_next, state = sampler.step(cfg, sch, i, out, x, state, draws)
        row = np.asarray(x_next, dtype=np.float64)
        if not np.isfinite(row).all():
            raise UsageError(
                f"scheduler {name!r}: step {i} of {steps} has non-finite coefficients for this config; "
                "it diverges in `denoise` too"
            )
        if len(draws.drawn) - before > 1:
            raise UsageError(f"internal: scheduler {name!r} drew noise twice in one step")
        state, derived = kept.symbols_for(state)
        row.flags.writeable = False
        evaluations.append(LinearEvaluation(
            timestep=float(sch.timesteps[i]),
            input_scale=float(x_in[k]),  # scale_input is x times a scalar
            row=row,
            noise=draws.drawn[-1] if len(draws.drawn) > before else None,
            derived=derived,
        ))
    return (float(sch.init_noise_sigma) if first == 0 else 1.0), tuple(evaluations)


class _KeptTensors:
    """Replaces the long rows in a scheduler's state by symbols of their own (linear_run's
    keep_terms), numbered from `first`; None keeps every row as it is."""

    def __init__(self, first: int, size: int, keep_terms: int | None) -> None:
        self.next, self.size, self.keep_terms = first, size, keep_terms

    def symbols_for(self, state: Any) -> tuple[Any, tuple[tuple[int, np.ndarray], ...]]:
        """(the state with its long rows replaced by one-hot symbols, [(symbol, row), ...])."""
        if self.keep_terms is None:
            return state, ()
        made: dict[int, tuple[int, np.ndarray]] = {}  # id(row) -> (symbol, row): a row kept twice is one symbol

        def replaced(value: Any) -> Any:
            if isinstance(value, np.ndarray) and value.shape == (self.size,):
                if np.count_nonzero(value) <= self.keep_terms:
                    return value
                if id(value) not in made:
                    if self.next >= self.size:
                        raise UsageError("internal: more kept tensors than linear_run has symbols for")
                    row = np.asarray(value, dtype=np.float64)
                    row.flags.writeable = False
                    made[id(value)] = (self.next, row)
                    self.next += 1
                one_hot = np.zeros(self.size)
                one_hot[made[id(value)][0]] = 1.0
                return one_hot
            if isinstance(value, tuple):
                parts = [replaced(part) for part in value]
                return type(value)(*parts) if hasattr(value, "_fields") else tuple(parts)
            return value

        return replaced(state), tuple(made.values())


def sampling_plan(name: str, config: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """The plan of scheduler `name` with `config` for `steps` steps, as a JSON-able dict.

    Args:
        name: one of `schedulers.request_names()` (the pipeline's): a scheduler, or
            `<name>_karras` for the config with use_karras_sigmas on.
        config: a diffusers scheduler config dict, as `denoise` takes it.
        steps: number of inference steps N.

    Returns:
        {"plan_version": 1, "scheduler", "steps", "config" (the keys the scheduler read),
        "linear": True, "stochastic", "init_noise_sigma", "evaluations": [{"timestep",
        "input_scale", "samples": [[j, a]], "outputs": [[j, b]], "noise": c or None}, ...]};
        for a non-linear config {"plan_version", "scheduler", "steps", "linear": False,
        "reason"}. UsageError for unknown names, bad step counts, unsupported configs.
    """
    requested = name
    name, config = resolve_request(requested, config)
    head = {"plan_version": PLAN_VERSION, "scheduler": requested, "steps": steps}
    run = linear_run(name, config, steps)
    if isinstance(run, str):
        return {**head, "linear": False, "reason": run}
    init_noise_sigma, linear = run
    sampler, cfg, _ = _setup(name, config, steps)
    S = len(linear)
    evaluations = [{
        "timestep": ev.timestep,
        "input_scale": ev.input_scale,
        "samples": _terms(ev.row, 0, i + 1),
        "outputs": _terms(ev.row, S + 1, i + 1),
        "noise": None if ev.noise is None else float(ev.row[ev.noise]),
    } for i, ev in enumerate(linear)]
    plain = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in cfg.items()}
    return {
        **head,
        "linear": True,
        "stochastic": draws_noise(sampler, cfg),
        "config": plain,
        "init_noise_sigma": init_noise_sigma,
        "evaluations": evaluations,
    }


def check_plan(plan: Mapping[str, Any]) -> None:
    """UsageError unless `plan` is a linear plan of this version with well-formed evaluations."""
    if not isinstance(plan, Mapping) or plan.get("plan_version") != PLAN_VERSION:
        got = plan.get("plan_version") if isinstance(plan, Mapping) else type(plan).__name__
        raise UsageError(f"not a version-{PLAN_VERSION} sampling plan (plan_version {got!r})")
    if not plan.get("linear", False):
        raise UsageError(f"this plan cannot be run: {plan.get('reason', 'it is not linear')}")
    for i, ev in enumerate(plan["evaluations"]):
        for key in ("samples", "outputs"):
            if any(not 0 <= j <= i for j, _ in ev[key]):
                raise UsageError(f"plan evaluation {i}: {key} refers to a later index than {i}")


def run_plan(
    plan: Mapping[str, Any],
    model: Model,
    latents: np.ndarray,
    rng: NoiseSource | None = None,
    callback: Callable[[int, int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """The host loop of docs/CONTRACT.md in NumPy: `denoise`'s result from the plan alone.

    Arithmetic is the contract's, so other hosts match it bit for bit: products and sums in
    float64 in the listed order (samples, then outputs, then noise), one rounding to float32.
    """
    check_plan(plan)
    evaluations = plan["evaluations"]
    if plan["stochastic"] and rng is None:
        raise UsageError(f"scheduler {plan['scheduler']!r} is stochastic: pass rng=PortableNoise(seed)")
    f32 = np.float32
    xs = [(np.asarray(latents, dtype=f32).astype(np.float64) * plan["init_noise_sigma"]).astype(f32)]
    es: list[np.ndarray] = []
    for i, ev in enumerate(evaluations):
        x_in = (xs[-1].astype(np.float64) * ev["input_scale"]).astype(f32)
        es.append(np.asarray(model(x_in, ev["timestep"]), dtype=f32))
        acc = np.zeros(xs[-1].shape)
        for j, a in ev["samples"]:
            acc = acc + a * xs[j].astype(np.float64)
        for j, b in ev["outputs"]:
            acc = acc + b * es[j].astype(np.float64)
        if ev["noise"] is not None:
            z = np.asarray(rng.standard_normal(xs[-1].shape, dtype=f32), dtype=f32)
            acc = acc + ev["noise"] * z.astype(np.float64)
        xs.append(acc.astype(f32))
        if callback is not None:
            callback(i, len(evaluations), xs[-1])
    return xs[-1]


# --- plans for a model folder ------------------------------------------------------------------


def folder_config(folder: str | Path) -> dict[str, Any]:
    """The scheduler config the pipeline uses for `folder`: its scheduler_config.json, with the
    manifest's prediction_type (the manifest is the source of truth for what the UNet predicts)."""
    from sdport.models.manifest import ManifestError, inside, read_json, read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    path = inside(folder, manifest.scheduler_config)
    config = read_json(path)
    if not isinstance(config, dict):
        raise ManifestError(f"{path}: expected a JSON object (a diffusers scheduler config)")
    return {**config, "prediction_type": manifest.prediction_type}


def plan_path(folder: str | Path, scheduler: str, steps: int) -> Path:
    """Where hosts look for a plan by default: `<folder>/plans/<scheduler>-<steps>.json`."""
    return Path(folder) / "plans" / f"{scheduler}-{steps}.json"


def write_folder_plans(
    folder: str | Path, schedulers: list[str], steps: list[int], out: str | Path | None = None
) -> list[Path]:
    """Writes the plan of each scheduler x step count for `folder`'s config; returns the paths.

    Default location `plan_path(...)`; `out` (one plan only) writes that file instead. A config
    that is not linear is a UsageError here (the plan would only carry the reason).
    """
    import json

    jobs = [(s, n) for s in schedulers for n in steps]
    if out is not None and len(jobs) != 1:
        raise UsageError(f"-o names one file but {len(jobs)} plans were asked for; drop -o to write them to plans/")
    config = folder_config(folder)
    paths = []
    for scheduler, n in jobs:
        plan = sampling_plan(scheduler, config, n)
        if not plan["linear"]:
            raise UsageError(plan["reason"])
        path = Path(out) if out is not None else plan_path(folder, scheduler, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan) + "\n", encoding="utf-8")  # compact: UniPC-50 is 72 kB
        paths.append(path)
    return paths
