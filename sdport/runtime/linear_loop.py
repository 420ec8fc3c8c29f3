"""The pipeline's denoising loop as one vector-matrix product per step: a compiled sampling plan.

Every scheduler step is linear in the samples, model outputs and noise seen so far (plans.py), and
so is classifier-free guidance, e = u + g (t - u) of the UNet's unconditional and text halves. So
for a fixed scheduler config, step count, start and guidance, each step's new sample x_k+1 is one
[slots] @ [slots, latents] product over the few tensors later steps still read ("slots": rows of
one float64 array), and the next UNet input is x_k+1 * input_scale, written into the buffer the
UNet reads (Loop.unet_input, one feed for every run: Graph.repeated). A step then costs six or
seven NumPy calls around the UNet's run, each on arrays of one shape, where a scheduler's step
function and the guidance took 20-30: on a small model, whose UNet runs in a millisecond or two,
those calls were 2-3% of a step.

The arithmetic is the plan's (docs/CONTRACT.md, "The same loop with fewer operations"): float64
sums of float32 tensors, each sample rounded to float32 once, but in the order BLAS picks and with
the guidance folded in; `denoise`, whose step functions compute in float32, agrees to float32
rounding (tests/test_linear_loop.py). Configs that are not linear (clip_sample, thresholding)
and guidance_rescale, which divides by standard deviations, are not compiled: the pipeline runs
`denoise` for those (and for any run that would keep more than MAX_SLOTS tensors; none does).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sdport.errors import UsageError
from sdport.runtime.plans import LinearEvaluation, linear_run
from sdport.runtime.schedulers import _hashable
from sdport.runtime.schedulers.sampler import NoiseSource

# A step's product reads every row, so its cost and the history's memory grow with the rows. Most
# schedulers need 3-9 at any step count. UniPC's corrected sample expands into every earlier
# tensor (147 rows at 50 steps): it is kept as a tensor of its own instead (one product more a
# step). Anything still past this runs as step functions.
MAX_SLOTS = 16

# A BLAS runs a large product on several threads, whose workers then spin, waiting for more work:
# NumPy's OpenBLAS (0.3.30) from about 460K elements on, ~0.1 s of a core after each product,
# taken from the UNet's next run. So each step's product is made in blocks of columns of at most
# this many elements, which one thread runs: one block up to 29K latent elements with 9 rows
# (an SD image at 512 px has 16K).
BLOCK_ELEMENTS = 1 << 18


@dataclass(frozen=True, slots=True)
class CompiledStep:
    """One model evaluation. mix: [slots] float64, x_k+1's coefficients; next_input_scale: the next
    evaluation's (None on the last); the UNet's output goes to the `copies` slots from output_slot
    (None: no step reads it); draws: this step takes a noise draw, kept in noise_slot (None: its
    coefficient is 0, as DPM++ 2M SDE's last); sample_slot keeps x_k+1 (None: unread); derived:
    (mix, slot) of each tensor the scheduler keeps that this step makes (UniPC's corrected sample)."""

    timestep: float
    mix: np.ndarray
    next_input_scale: np.float32 | None
    output_slot: int | None
    draws: bool
    noise_slot: int | None
    sample_slot: int | None
    derived: tuple[tuple[np.ndarray, int], ...] = ()


@dataclass(frozen=True)
class CompiledPlan:
    """x_0 = latents * x0_scale (float32), kept in x0_slot; the first input is x_0 * input_scale;
    copies: 2 with guidance (the UNet's batch is [uncond, text]), else 1."""

    x0_scale: float
    input_scale: float
    x0_slot: int | None
    slots: int
    copies: int
    steps: tuple[CompiledStep, ...]


class _Slots:
    """Rows of the history array, each held by one tensor (a plan symbol and, for a guided output,
    its half: 0 uncond, 1 text) until the last step that reads it has run."""

    def __init__(self) -> None:
        self.holder: list[tuple[int, int] | None] = []

    def take(self, symbol: int, halves: int = 1) -> int:
        """The first of `halves` adjacent free rows, now held by the symbol's halves."""
        free = [h is None for h in self.holder] + [True] * halves
        first = next(r for r in range(len(free)) if all(free[r : r + halves]))
        self.holder.extend([None] * max(0, first + halves - len(self.holder)))
        for half in range(halves):
            self.holder[first + half] = (symbol, half)
        return first

    def release(self, symbols: set[int]) -> None:
        self.holder = [None if h is not None and h[0] in symbols else h for h in self.holder]

    def row(self, symbol: int) -> int:
        return self.holder.index((symbol, 0))


def compile_plan(name: str, config: Mapping[str, Any], steps: int, start_step: int,
                 guidance: float | None) -> CompiledPlan | None:
    """The run of scheduler `name` (a base name, as `denoise` takes it) with `config`, `steps` and
    `start_step`, with the UNet's output guided by `guidance` (None: unguided, one copy), compiled;
    None when the config's steps are not linear or need more than MAX_SLOTS rows. UsageError
    where `denoise` would raise one."""
    key = _hashable(config)
    if key is None:
        return _compile(name, config, steps, start_step, guidance)
    return _cached_compile(name, key, steps, start_step, guidance)


@functools.lru_cache(maxsize=32)
def _cached_compile(name: str, cfg_items: tuple[tuple[str, str, Any], ...], steps: int, start_step: int,
                    guidance: float | None) -> CompiledPlan | None:
    return _compile(name, {key: value for key, _, value in cfg_items}, steps, start_step, guidance)


def _compile(name: str, config: Mapping[str, Any], steps: int, start_step: int,
             guidance: float | None) -> CompiledPlan | None:
    plan = _compile_run(linear_run(name, config, steps, start_step), guidance)
    if plan is False:  # too many rows: what the scheduler keeps with long rows becomes tensors of its own
        plan = _compile_run(linear_run(name, config, steps, start_step, keep_terms=2), guidance)
    return plan or None


def _compile_run(run: tuple[float, tuple[LinearEvaluation, ...]] | str,
                 guidance: float | None) -> CompiledPlan | bool | None:
    """`run` compiled; None if it is not linear, False if it needs more than MAX_SLOTS rows."""
    if isinstance(run, str):
        return None
    x0_scale, evaluations = run
    S = len(evaluations)
    e0, copies = S + 1, 1 if guidance is None else 2
    # The guided output's halves as symbols of their own: e_k = (1 - g) u_k + g t_k, with g
    # rounded to float32 as the guidance arithmetic it replaces did.
    g = float(np.float32(guidance)) if guidance is not None else 1.0
    halves = (1.0 - g, g) if copies == 2 else (1.0,)
    last_read: dict[int, int] = {}
    for k, ev in enumerate(evaluations):
        for row in (ev.row, *(made for _, made in ev.derived)):
            for symbol in np.flatnonzero(row):
                last_read[int(symbol)] = k
    slots = _Slots()

    def over_slots(row: np.ndarray) -> np.ndarray:
        mix = np.zeros(len(slots.holder))
        for symbol in np.flatnonzero(row):
            coefficient = row[symbol]
            if e0 <= symbol < e0 + S:
                first = slots.row(int(symbol))
                for offset, share in enumerate(halves):
                    mix[first + offset] += coefficient * share
            else:
                mix[slots.row(int(symbol))] += coefficient
        return mix

    x0_slot = slots.take(0) if 0 in last_read else None
    compiled = []
    for k, ev in enumerate(evaluations):
        # Rows a step writes before its products must not be read by them: the UNet's output and
        # the draw take free rows; x_k+1 and the derived tensors, written after the products, may
        # reuse the rows those read last.
        output_slot = slots.take(e0 + k, copies) if e0 + k in last_read else None
        noise_slot = slots.take(ev.noise) if ev.noise is not None and ev.noise in last_read else None
        mix = over_slots(ev.row)
        derived = [(symbol, over_slots(made)) for symbol, made in ev.derived if symbol in last_read]
        slots.release({s for s, last in last_read.items() if last == k})
        derived_slots = tuple((made, slots.take(symbol)) for symbol, made in derived)
        sample_slot = slots.take(k + 1) if k + 1 in last_read else None
        if len(slots.holder) > MAX_SLOTS:
            return False
        next_input_scale = np.float32(evaluations[k + 1].input_scale) if k + 1 < S else None
        compiled.append(CompiledStep(ev.timestep, mix, next_input_scale, output_slot, ev.noise is not None,
                                     noise_slot, sample_slot, derived_slots))
    width = len(slots.holder)
    steps_padded = tuple(replace(c, mix=_padded(c.mix, width),
                                 derived=tuple((_padded(made, width), slot) for made, slot in c.derived))
                         for c in compiled)
    return CompiledPlan(x0_scale, evaluations[0].input_scale, x0_slot, width, copies, steps_padded)


def _padded(mix: np.ndarray, width: int) -> np.ndarray:
    """`mix` with zeros for the rows taken after its step."""
    padded = np.zeros(width)
    padded[: len(mix)] = mix
    padded.flags.writeable = False
    return padded


class NotFinite(Exception):
    """x_k+1 has NaN or inf after evaluation k; `in_output`: so has that evaluation's model output."""

    def __init__(self, k: int, in_output: bool) -> None:
        super().__init__(f"NaN or inf after evaluation {k}" + (" (in the model's output)" if in_output else ""))
        self.k, self.in_output = k, in_output


def has_non_finite(x: np.ndarray) -> bool:
    """Whether float32 `x` holds NaN or inf. x . x is inf or NaN where any element is, in a third of
    isfinite().all()'s time; past |x| ~ 1e19 it overflows, and the full check decides."""
    return not math.isfinite(np.vdot(x, x)) and not np.isfinite(x).all()


class Loop:
    """A compiled plan's run on latents of one shape.

    `unet_input`: the UNet's input, [copies * B, ...] float32, rewritten in place before each
    evaluation, so that a session can take it as the same feed at every run (Graph.repeated).
    """

    def __init__(self, plan: CompiledPlan, shape: tuple[int, ...]) -> None:
        self.plan, self.shape = plan, shape
        sample = np.empty((plan.copies, *shape), dtype=np.float32)
        self.unet_input = sample.reshape((plan.copies * shape[0], *shape[1:]))
        # The copies guidance batches, as views of the latents' shape.
        self._first_input, self._other_inputs = sample[0], tuple(sample[1:])

    def _set_input(self, x: np.ndarray, scale: np.float32) -> None:
        """Each copy of the UNet's input = x * scale (float32). One product and a copy per further
        copy: a product broadcast into all copies takes NumPy's general iterator, whose code a UNet
        run leaves out of the caches: 5 us a step against 1.8 us for these two calls."""
        np.multiply(x, scale, out=self._first_input)
        for copy in self._other_inputs:
            np.copyto(copy, self._first_input)

    def run(self, latents: np.ndarray, unet: Callable[[int], np.ndarray], rng: NoiseSource | None,
            callback: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
        """The denoised latents (float32, the latents' shape) from unit-variance `latents` (or,
        when the plan starts mid-schedule, noised latents).

        `unet(k)`: the UNet's raw output for evaluation k on `unet_input`, of its shape ([uncond,
        text] with guidance); the loop may keep it until the next call. `rng.standard_normal(shape,
        dtype=np.float32)` is called at each draw, as `denoise` calls it. `callback(k, total,
        x_k+1)` after each evaluation. NotFinite where x_k+1 has NaN or inf.
        """
        plan, shape, unet_input, set_input = self.plan, self.shape, self.unet_input, self._set_input
        if rng is None and any(step.draws for step in plan.steps):
            raise UsageError("this run draws noise: pass rng, e.g. PortableNoise(seed)")
        if latents.shape != shape:
            raise UsageError(f"latents of shape {latents.shape} for a loop made for {shape}")
        x = np.asarray(latents, dtype=np.float32) * np.float32(plan.x0_scale)
        history = np.zeros((plan.slots, x.size))  # zeros: a coefficient 0 times unwritten memory could be NaN
        if plan.x0_slot is not None:
            history[plan.x0_slot] = x.ravel()
        # x_in = x * input_scale in float32, as a scheduler's scale_input: in float64, as the plan's
        # hosts do, the cast into float32 took 2 us more a step (one ulp apart at most)
        set_input(x, np.float32(plan.input_scale))
        # Each slot's row, and the UNet output's rows from each slot, as views of the shapes stored
        # there, and x_k+1 made in one float64 buffer: after a UNet run each NumPy call here costs
        # 1-5 us, slicing and reshaping included (a tiny model's step is 1.5 ms).
        rows = [row.reshape(shape) for row in history]
        output_rows = {step.output_slot: history[step.output_slot : step.output_slot + plan.copies].reshape(unet_input.shape)
                       for step in plan.steps if step.output_slot is not None}
        made = np.empty(shape)
        made_flat = made.reshape(-1)
        width = max(1, BLOCK_ELEMENTS // plan.slots)
        columns = [slice(start, start + width) for start in range(0, x.size, width)]
        blocks = [(history[:, c], made_flat[c]) for c in columns]  # (the rows' columns, x_k+1's)

        def product(mix: np.ndarray) -> np.ndarray:
            """mix @ history, a new array."""
            value = np.empty(x.size)
            for c, (rows_part, _) in zip(columns, blocks):
                np.dot(mix, rows_part, out=value[c])
            return value

        total = len(plan.steps)
        for k, step in enumerate(plan.steps):
            out = unet(k)
            # A graph's output shape follows its input's, which is the same at every step.
            if k == 0 and out.shape != unet_input.shape:
                raise UsageError(f"the model returned shape {out.shape} for input {unet_input.shape}; "
                                 "it must return one prediction per latent element")
            if step.output_slot is not None:
                output_rows[step.output_slot][...] = out
            if step.draws:
                z = rng.standard_normal(shape, dtype=np.float32)
                if step.noise_slot is not None:
                    rows[step.noise_slot][...] = z
            # Vector-matrix products: BLAS's matrix-matrix one packs the history first, which at
            # SD's latents took twice as long. Derived tensors may overwrite rows that x_k+1
            # reads: they are made first, and stored after.
            kept = [(slot, product(mix)) for mix, slot in step.derived] if step.derived else ()
            for rows_part, made_part in blocks:
                np.dot(step.mix, rows_part, out=made_part)
            for slot, value in kept:
                history[slot] = value
            x = made.astype(np.float32)
            # Every step folds the model's output into x_k+1, and NaN or inf survive that
            # arithmetic, so this one check covers both; the output is looked at only to say which.
            if has_non_finite(x):
                raise NotFinite(k, not np.isfinite(out).all())
            if step.sample_slot is not None:
                rows[step.sample_slot][...] = x
            if step.next_input_scale is not None:
                set_input(x, step.next_input_scale)
            if callback is not None:
                callback(k, total, x)
        return x


def run(plan: CompiledPlan, latents: np.ndarray, unet: Callable[[np.ndarray, int], np.ndarray],
        rng: NoiseSource | None, callback: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
    """Loop(plan, latents.shape).run(latents, ...) with `unet(sample, k)`: the UNet's raw output for
    evaluation k on `sample` (Loop's unet_input), which it must not keep."""
    loop = Loop(plan, latents.shape)
    return loop.run(latents, lambda k: unet(loop.unet_input, k), rng, callback)
