"""Scheduler overhead per model evaluation: sdport (NumPy) against diffusers (torch), CPU.

    python benchmarks/bench_schedulers.py [--out benchmarks/results/schedulers.json]
                                          [--steps 20] [--repeat 3] [--unet-onnx PATH]

The model is trivial (returns its input scaled), so the time is the scheduler's own: total loop
time / model evaluations, best of --repeat. Two sdport columns: the step functions (`denoise`)
and the compiled loop the pipeline runs where a run is linear (linear_loop.py, unguided here as
the others; "-" for a run it does not compile).
For scale: an SD 1.5 UNet evaluation at 512x512 (latents 1x4x64x64, batch 2 with guidance)
takes ~2-10 s on a CPU, so either scheduler is noise next to it. With --unet-onnx the script
times one evaluation of that ONNX UNet (onnxruntime, CPU) for the table's last line. The
diffusers column needs torch and diffusers installed (export extra).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdport.models.families import scheduler_config  # noqa: E402
from sdport.runtime import linear_loop  # noqa: E402
from sdport.runtime.schedulers import available, denoise  # noqa: E402

SD15 = scheduler_config("sd1")  # the v1-5 scheduler config sdport ships
SHAPES = ((1, 4, 64, 64), (2, 4, 128, 128))


def trivial_model(x: np.ndarray, t: float) -> np.ndarray:
    return x * np.float32(0.5)


def time_sdport(name: str, shape: tuple[int, ...], steps: int, repeat: int) -> tuple[float, int]:
    """(seconds per model evaluation, evaluations) for sdport's loop."""
    latents = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    best, evals = float("inf"), 0
    for _ in range(repeat):
        calls = []
        t0 = time.perf_counter()
        denoise(name, SD15, lambda x, t: calls.append(t) or trivial_model(x, t), latents, steps,
                rng=np.random.default_rng(0))
        best = min(best, time.perf_counter() - t0)
        evals = len(calls)
    return best / evals, evals


def time_compiled(name: str, shape: tuple[int, ...], steps: int, repeat: int) -> float | None:
    """Seconds per model evaluation for the pipeline's compiled loop, unguided; None if the run
    does not compile."""
    plan = linear_loop.compile_plan(name, SD15, steps, 0, None)
    if plan is None:
        return None
    latents = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        linear_loop.run(plan, latents, lambda x, k: trivial_model(x, 0.0), np.random.default_rng(0),
                        lambda k, total, x: None)
        best = min(best, time.perf_counter() - t0)
    return best / len(plan.steps)


def diffusers_schedulers() -> dict | None:
    """name -> a configured diffusers scheduler, or None without torch/diffusers."""
    try:
        import diffusers
        import scipy  # noqa: F401  (LMSDiscreteScheduler needs it)
    except ImportError:
        return None
    classes = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "ddpm": (diffusers.DDPMScheduler, {}),
        "pndm": (diffusers.PNDMScheduler, {}),
        "lms": (diffusers.LMSDiscreteScheduler, {}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "heun": (diffusers.HeunDiscreteScheduler, {}),
        "dpm2": (diffusers.KDPM2DiscreteScheduler, {}),
        "dpm2_ancestral": (diffusers.KDPM2AncestralDiscreteScheduler, {}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        "dpmpp_2s": (diffusers.DPMSolverSinglestepScheduler, {}),
        "unipc": (diffusers.UniPCMultistepScheduler, {}),
        "deis": (diffusers.DEISMultistepScheduler, {}),
        "lcm": (diffusers.LCMScheduler, {}),
    }
    return {name: cls.from_config({**SD15, **extra}) for name, (cls, extra) in classes.items()}


def time_diffusers(base, shape: tuple[int, ...], steps: int, repeat: int) -> float:
    """Seconds per model evaluation for diffusers' pipeline loop with the same trivial model."""
    import inspect

    import torch

    latents = torch.from_numpy(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    best = float("inf")
    for _ in range(repeat):
        sched = copy.deepcopy(base)
        kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(sched.step).parameters else {}
        t0 = time.perf_counter()
        sched.set_timesteps(steps)
        x = latents * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            x = sched.step(x_in * 0.5, t, x, **kwargs).prev_sample
        best = min(best, time.perf_counter() - t0)
    return best / len(sched.timesteps)


def time_unet(path: str, repeat: int) -> float | None:
    """Seconds for one SD 1.5 UNet evaluation (batch 2, 64x64 latents) with onnxruntime on CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        dims = [d if isinstance(d, int) else {"sample": 2}.get(inp.name, 2) for d in inp.shape]
        if inp.name == "sample":
            dims = [2, 4, 64, 64]
        elif "hidden" in inp.name:
            dims = [2, 77, dims[-1] if isinstance(dims[-1], int) else 768]
        elif "timestep" in inp.name:
            dims = [d for d in dims] or []
        dtype = np.float16 if "float16" in inp.type else (np.int64 if "int64" in inp.type else np.float32)
        feeds[inp.name] = np.ones(dims, dtype=dtype)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/schedulers.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--unet-onnx", default=None, help="optional SD 1.5 UNet .onnx to time one evaluation")
    args = parser.parse_args(argv)

    reference = diffusers_schedulers()
    rows = []
    print(f"{'scheduler':16s} {'latents':>14s} {'evals':>5s} {'sdport ms/eval':>15s} {'compiled':>9s} "
          f"{'diffusers ms/eval':>18s} {'ratio':>6s} {'compiled':>8s}")
    for shape in SHAPES:
        for name in available():
            ours, evals = time_sdport(name, shape, args.steps, args.repeat)
            compiled = time_compiled(name, shape, args.steps, args.repeat)
            theirs = time_diffusers(reference[name], shape, args.steps, args.repeat) if reference else None
            ratio = ours / theirs if theirs else None
            compiled_ratio = compiled / theirs if theirs and compiled else None
            rows.append({
                "scheduler": name, "shape": list(shape), "steps": args.steps, "evaluations": evals,
                "sdport_s_per_eval": ours, "compiled_s_per_eval": compiled, "diffusers_s_per_eval": theirs,
                "ratio_sdport_over_diffusers": ratio, "ratio_compiled_over_diffusers": compiled_ratio,
            })
            compiled_txt = f"{compiled * 1e3:9.3f}" if compiled else f"{'-':>9s}"
            theirs_txt = f"{theirs * 1e3:18.3f}" if theirs else f"{'n/a':>18s}"
            ratio_txt = f"{ratio:6.2f}" if ratio else f"{'':>6s}"
            compiled_ratio_txt = f"{compiled_ratio:8.2f}" if compiled_ratio else f"{'':>8s}"
            print(f"{name:16s} {'x'.join(map(str, shape)):>14s} {evals:5d} {ours * 1e3:15.3f} {compiled_txt} "
                  f"{theirs_txt} {ratio_txt} {compiled_ratio_txt}")

    unet = time_unet(args.unet_onnx, args.repeat) if args.unet_onnx else None
    if unet:
        print(f"SD UNet ({args.unet_onnx}), one evaluation, batch 2 64x64: {unet:.2f} s")
    else:
        print("for scale: one SD 1.5 UNet evaluation takes ~2-10 s on CPU (pass --unet-onnx to measure)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__},
        "note": "scheduler cost per model evaluation with a trivial model; an SD 1.5 UNet step is ~2-10 s on CPU",
        "unet_s_per_eval": unet,
        "rows": rows,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
