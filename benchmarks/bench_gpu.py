"""The GPU table: sdport on onnxruntime's CUDA provider vs diffusers fp16 on the same GPU and weights.

    python benchmarks/bench_gpu.py --model <diffusers folder> --onnx <sdport --fp16 export>
                                   [--fp32-vae <export with --fp16 --fp32-vae>] [--sizes 256,512] [--steps 20]
                                   [--runs 10] [--out gpu.json]

Needs onnxruntime-gpu in place of onnxruntime (README, "On a GPU"), torch with CUDA and diffusers. As bench_sd.py,
every measurement runs in a fresh process, with the files it reads in the page cache; ratios are
sdport / diffusers from this same run.

  unet step       one UNet evaluation, batch 2 (guidance), fp16, median of --runs after warm-ups:
                  diffusers eager (its default SDPA attention) vs sdport's graph as the pipeline
                  runs it (I/O binding, the text embeddings kept on the GPU, latents copied in and
                  out per step), and the same graph captured once as a CUDA graph
  unet parity     max |sdport - diffusers| of that step's output, relative to max |diffusers|
  text-to-image   --steps steps (each side's default scheduler, PNDM for SD 1.5) at --image-size:
                  cold = process start to PNG written, warm = a second image in the same process;
                  sdport as its pipeline runs by default (all sessions held), with the UNet as
                  captured CUDA graphs (Pipeline.load(cuda_graphs=True)), and one session at a
                  time (low_memory); with --fp32-vae FOLDER once more, on that export
  share of a step the host time of a denoising step outside onnxruntime's run (scheduler, Python,
                  latents copied in and out), as bench_sd.py's overhead, and split in two: the
                  time in sdport's Graph.run around onnxruntime's run (casts, host <-> device
                  copies) and the rest of the loop (scheduler, guidance, Python); not for
                  low_memory, whose denoising loop includes making the UNet's session
  GPU memory      peak device memory in use while the process ran, minus what was in use before
                  (NVML, sampled every 5 ms; the CUDA context is counted on both sides)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_sd  # noqa: E402  (after the path setup)

WARMUPS = 3
# `--dry-run` runs the same code on CPU (fp32 torch, onnxruntime's CPU provider, no memory
# sampling) on a small model, to check the script before spending GPU time.
DEVICE = os.environ.get("SDPORT_BENCH_DEVICE", "cuda")
PROVIDER = "cuda" if DEVICE == "cuda" else "cpu"


@contextlib.contextmanager
def gpu_memory_peak(result: dict):
    """Samples the device's used memory in a thread; stores the peak above the starting level."""
    if DEVICE != "cuda":
        yield
        return
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    with bench_sd.sampled_peak(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used, 0.005) as used:
        yield
    result["gpu_peak_mb"] = (used["peak"] - used["start"]) / 2**20


def _timed(step, runs: int) -> dict:
    times = bench_sd.run_times(step, WARMUPS + runs)
    return {"warmup_s": times[:WARMUPS], "times_s": times[WARMUPS:], "median_s": bench_sd.median(times[WARMUPS:])}


# --- workers -----------------------------------------------------------------------------------


def worker_unet_torch(model: str, folder: str, size: int, runs: int, npy: str) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from sdport.export.quantize import unet_feeds
    from sdport.models.manifest import read_manifest

    torch.set_grad_enabled(False)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    result: dict = {}
    with gpu_memory_peak(result):
        t0 = time.perf_counter()
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype).to(DEVICE)
        result["load_s"] = time.perf_counter() - t0
        manifest = read_manifest(Path(folder))
        feeds = unet_feeds(manifest, size // manifest.vae_scale)  # the same inputs on both sides
        sample = torch.from_numpy(feeds["sample"]).to(DEVICE, dtype)
        hidden = torch.from_numpy(feeds["encoder_hidden_states"]).to(DEVICE, dtype)
        timestep = torch.from_numpy(feeds["timestep"]).to(DEVICE)

        def step():
            out = unet(sample, timestep, encoder_hidden_states=hidden).sample
            return out.float().cpu().numpy()  # as sdport: the output crosses to the host

        result.update(_timed(step, runs))
        np.save(npy, step())
    return result


def _bound_step(path: Path, fused: bool, feeds: dict, cuda_options: dict):
    """The UNet on fixed device buffers (inputs updated in place), with extra CUDA provider options:
    `enable_cuda_graph` (captured at the first run, then replayed) or `prefer_nhwc`."""
    import numpy as np
    import onnxruntime as ort

    from sdport.runtime.options import session_options
    from sdport.runtime.sessions import ORT_DTYPES

    session = ort.InferenceSession(
        str(path), session_options("cuda", fused),
        providers=[("CUDAExecutionProvider", cuda_options)],
    )
    inputs = {p.name: p for p in session.get_inputs()}
    device = {}
    for name, value in feeds.items():
        dtype = ORT_DTYPES[inputs[name].type]
        # np.array, not np.ascontiguousarray: that makes a 0-d timestep 1-d.
        device[name] = ort.OrtValue.ortvalue_from_numpy(np.array(value, dtype=dtype, order="C"), "cuda", 0)
    out_type = ORT_DTYPES[session.get_outputs()[0].type]
    output = ort.OrtValue.ortvalue_from_shape_and_type(feeds["sample"].shape, out_type, "cuda", 0)
    binding = session.io_binding()
    for name, value in device.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output(session.get_outputs()[0].name, output)

    def step():
        device["sample"].update_inplace(feeds["sample"])  # the latents change every step
        session.run_with_iobinding(binding)
        return output.numpy()

    return step


def worker_unet_sdport(folder: str, size: int, runs: int, npy: str, cuda_options: dict | None) -> dict:
    import numpy as np

    from sdport.export.quantize import unet_feeds
    from sdport.models.manifest import read_manifest
    from sdport.runtime.graph_files import check_graph_files
    from sdport.runtime.sessions import Graph, resolve_provider

    result: dict = {}
    with gpu_memory_peak(result):
        manifest = read_manifest(Path(folder))
        spec = manifest.graphs["unet"]
        path = check_graph_files(Path(folder), spec.file)
        fused = spec.optimization == "ort"
        feeds = unet_feeds(manifest, size // manifest.vae_scale)
        resolve_provider(PROVIDER)  # loads the CUDA libraries as the pipeline does
        t0 = time.perf_counter()
        if cuda_options:
            if PROVIDER != "cuda":
                raise SystemExit(f"{cuda_options} need the CUDA provider")
            step = _bound_step(path, fused, feeds, cuda_options)
        else:
            graph = Graph("unet", path, PROVIDER, fused)
            graph.keep_on_device("encoder_hidden_states", feeds["encoder_hidden_states"])

            def step():
                return graph.run(feeds)["out_sample"]
        result["create_s"] = time.perf_counter() - t0
        result.update(_timed(step, runs))
        np.save(npy, np.asarray(step(), dtype=np.float32))
    return result


def worker_load_sdport(folder: str) -> dict:
    return bench_sd.worker_load_sdport(folder, provider=PROVIDER)


def worker_t2i_diffusers(**kwargs) -> dict:
    result: dict = {}
    with gpu_memory_peak(result):
        result.update(bench_sd.worker_t2i_diffusers(device=DEVICE, fp16=DEVICE == "cuda", **kwargs))
    return result


def worker_t2i_sdport(low_memory: bool = False, cuda_graphs: bool = False, **kwargs) -> dict:
    result: dict = {}
    with gpu_memory_peak(result):
        result.update(bench_sd.worker_t2i_sdport(provider=PROVIDER, low_memory=low_memory, cuda_graphs=cuda_graphs,
                                                 **kwargs))
    return result


# sdport's UNet as its pipeline runs it, then with CUDA provider options the pipeline doesn't set.
VARIANTS = {"sdport": None, "sdport_cuda_graph": {"enable_cuda_graph": "1"}, "sdport_nhwc": {"prefer_nhwc": "1"}}
WORKERS = {name[len("worker_"):]: fn for name, fn in globals().items() if name.startswith("worker_")}


def spawn(worker: str, **kwargs) -> dict:
    try:
        return bench_sd.spawn(worker, None, script=__file__, **kwargs)
    except RuntimeError as exc:  # one failed variant (a CUDA graph, say) must not lose the table
        print(str(exc)[-2000:], file=sys.stderr)
        return {"error": str(exc).strip().splitlines()[-1][:300]}


# --- the run -----------------------------------------------------------------------------------


def machine() -> dict:
    import subprocess

    info = bench_sd.machine()
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        gpu = ""
    info["cuda"] = gpu or "no nvidia-smi"
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        info["onnxruntime-gpu"] = version("onnxruntime-gpu")
    return info


def bench(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sdport-bench-gpu-"))
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "folders": {"diffusers": str(args.model), "fp16": str(args.onnx),
                          "fp32_vae": str(args.fp32_vae) if args.fp32_vae else None},
              "steps": args.steps, "image_size": args.image_size, "runs": args.runs, "unet": {}, "t2i": {}}

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        args.out.with_suffix(".partial.json").write_text(json.dumps(result, indent=2) + "\n")

    import numpy as np

    # Sessions and cold runs start from the pre-optimized graphs, as every load after the first does.
    result["first_load"] = {}
    for folder in filter(None, (args.onnx, args.fp32_vae)):
        result["first_load"][str(folder)] = spawn("load_sdport", folder=str(folder))
        say(f"first load {folder}: {result['first_load'][str(folder)].get('load_s', float('nan')):.1f} s")
    for size in args.sizes:
        row = result["unet"][str(size)] = {}
        bench_sd.read_into_page_cache(args.model)
        row["torch"] = spawn("unet_torch", model=str(args.model), folder=str(args.onnx), size=size, runs=args.runs,
                             npy=str(work / f"t{size}.npy"))
        for name, options in VARIANTS.items():
            npy = work / f"{name}{size}.npy"
            bench_sd.read_into_page_cache(args.onnx)
            row[name] = spawn("unet_sdport", folder=str(args.onnx), size=size, runs=args.runs, npy=str(npy),
                              cuda_options=options)
            if npy.exists() and (work / f"t{size}.npy").exists():
                want, got = np.load(work / f"t{size}.npy"), np.load(npy)
                row[name]["max_rel_error_vs_torch"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        say(f"unet {size}: " + ", ".join(f"{k} {v.get('median_s', float('nan')) * 1000:.1f} ms" for k, v in row.items()))
    runs = [("diffusers", "t2i_diffusers", {"model": str(args.model)}),
            ("sdport", "t2i_sdport", {"folder": str(args.onnx)}),
            ("sdport_cuda_graphs", "t2i_sdport", {"folder": str(args.onnx), "cuda_graphs": True}),
            ("sdport_low_memory", "t2i_sdport", {"folder": str(args.onnx), "low_memory": True})]
    if args.fp32_vae:
        runs.append(("sdport_fp32_vae", "t2i_sdport", {"folder": str(args.fp32_vae)}))
    for name, worker, options in runs:
        png = str(work / f"{name}.png")
        bench_sd.read_into_page_cache(Path(options.get("model") or options["folder"]))
        r = result["t2i"][name] = spawn(worker, size=args.image_size, steps=args.steps, png=png, warm=1, **options)
        if "png_at" in r:
            bench_sd.add_start_times(r)
        evals = r.get("eval_times_s") or [float("nan")]
        say(f"t2i {name}: cold {r.get('cold_s', float('nan')):.2f} s, warm {r.get('warm_s') or float('nan'):.2f} s, "
            f"UNet runs {1000 * evals[0]:.1f} ms first, {1000 * bench_sd.median(evals):.1f} median, "
            f"{1000 * max(evals):.1f} max; per step outside them {1000 * r.get('graph_io_s_per_step', float('nan')):.3f} ms "
            f"in Graph.run (casts, copies), {1000 * r.get('loop_python_s_per_step', float('nan')):.3f} ms in the loop")
    result["ratios"] = ratios(result)
    return result


# sdport's text-to-image runs: result key, ratio prefix, label suffix in the table.
T2I_ROWS = (("sdport", "t2i", ""), ("sdport_cuda_graphs", "t2i_cuda_graphs", ", sdport with CUDA graphs"),
            ("sdport_low_memory", "t2i_low_memory", ", sdport one session at a time"),
            ("sdport_fp32_vae", "t2i_fp32_vae", ", sdport --fp32-vae export"))


def ratios(r: dict) -> dict:
    out = {}

    def ratio(key, a, b):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = a / b

    for size, row in r["unet"].items():
        for name in VARIANTS:
            ratio(f"unet_{size}_{name}_time", row.get(name, {}).get("median_s"), row["torch"].get("median_s"))
            ratio(f"unet_{size}_{name}_gpu_mem", row.get(name, {}).get("gpu_peak_mb"), row["torch"].get("gpu_peak_mb"))
    d = r["t2i"].get("diffusers", {})
    for name, prefix, _ in T2I_ROWS:
        for key in ("cold_s", "ready_s", "warm_s", "gpu_peak_mb", "peak_rss_mb"):
            ratio(f"{prefix}_{key}", r["t2i"].get(name, {}).get(key), d.get(key))
    return out


def table(r: dict) -> str:
    def num(value, fmt, scale=1.0):
        return format(value * scale, fmt) if isinstance(value, (int, float)) else "-"

    def ratio(a, b):
        return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"

    variants = [v for v in VARIANTS if v != "sdport"]
    lines = [f"GPU: {r['machine']['cuda']}; {r['date']}; fp16 both sides; median of {r['runs']} runs after "
             f"{WARMUPS} warm-ups; text-to-image {r['steps']} steps at {r['image_size']}x{r['image_size']}, guidance "
             f"{bench_sd.GUIDANCE}.", "",
             "| measurement | diffusers fp16 | sdport fp16 | ratio | " + " | ".join(f"{v} | ratio" for v in variants) + " |",
             "|---|---|---|---|" + "---|---|" * len(variants)]
    for size, row in r["unet"].items():
        t = row["torch"]
        for label, key, fmt, scale in ((f"UNet step, batch 2, {size}px (ms)", "median_s", ".1f", 1000),
                                       (f"UNet GPU memory, {size}px (MB)", "gpu_peak_mb", ".0f", 1),
                                       (f"UNet session create / torch load, {size}px (s)", "create_s", ".1f", 1)):
            ref = t.get("load_s" if key == "create_s" else key)
            cells = [num(ref, fmt, scale)]
            for name in VARIANTS:
                mine = row.get(name, {}).get(key)
                cells += [num(mine, fmt, scale), ratio(mine, ref)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        cells = [""] + [c for name in VARIANTS for c in (num(row.get(name, {}).get("max_rel_error_vs_torch"), ".1e"), "")]
        lines.append(f"| UNet output vs diffusers, {size}px (max rel. error) | " + " | ".join(cells) + " |")
    d = r["t2i"].get("diffusers", {})
    blank = " |" * (2 * len(variants))
    for name, _, mode in T2I_ROWS:
        if name not in r["t2i"]:
            continue
        s = r["t2i"][name]
        for label, key, fmt, scale in (
                ("text-to-image cold, process start to PNG (s)", "cold_s", ".2f", 1),
                ("process start to pipeline loaded (s)", "ready_s", ".2f", 1),
                ("text-to-image warm (s)", "warm_s", ".2f", 1),
                ("text-to-image GPU memory (MB)", "gpu_peak_mb", ".0f", 1),
                ("text-to-image host peak RSS (MB)", "peak_rss_mb", ".0f", 1),
                ("scheduler + Python + copies, share of a step", "overhead_share", ".2%", 1),
                ("  of it, Graph.run's casts and host-device copies (ms per step)", "graph_io_s_per_step", ".3f", 1000),
                ("  of it, the rest of the loop: scheduler, guidance, Python (ms per step)", "loop_python_s_per_step",
                 ".3f", 1000)):
            if key not in ("cold_s", "ready_s", "warm_s", "gpu_peak_mb", "peak_rss_mb") and name == "sdport_low_memory":
                continue  # its loop includes making the UNet's session
            if key in ("graph_io_s_per_step", "loop_python_s_per_step") and key not in s:
                continue  # runs before this split was measured
            lines.append(f"| {label}{mode} | {num(d.get(key), fmt, scale)} | {num(s.get(key), fmt, scale)} | "
                         f"{ratio(s.get(key), d.get(key))} |{blank}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="diffusers folder (e.g. benchmarks/sd15_model.py's)")
    parser.add_argument("--onnx", type=Path, help="an sdport export of it with --fp16")
    parser.add_argument("--fp32-vae", type=Path, default=None,
                        help="optional: an export with --fp16 --fp32-vae, for one more text-to-image row")
    parser.add_argument("--sizes", default="256,512", help="UNet step sizes in pixels, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="text-to-image steps")
    parser.add_argument("--image-size", type=int, default=512, help="text-to-image size")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per UNet measurement")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="the same code on CPU, to check the script")
    bench_sd.add_worker_arguments(parser)
    args = parser.parse_args()
    if bench_sd.run_worker(WORKERS, args):
        return
    if not (args.model and args.onnx):
        parser.error("--model and --onnx are required")
    if args.dry_run:
        os.environ["SDPORT_BENCH_DEVICE"] = "cpu"  # read by the workers, which are fresh processes
    args.sizes = [int(s) for s in args.sizes.split(",")]
    bench_sd.run_and_write(args, bench, table)
    print(f"\nwrote {args.out}  ({platform.node()})")


if __name__ == "__main__":
    main()
