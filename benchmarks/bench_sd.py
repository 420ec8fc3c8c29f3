"""sdport vs diffusers/PyTorch on the same weights, side by side in one run: time, memory, size.

    python benchmarks/bench_sd.py --model tiny|sd15 [--sizes 256,512] [--steps N] [--image-size S]
                                  [--out benchmarks/results/sd.json] [--skip-install] [--no-int8]
                                  [--step-rounds N] [--warm-runs N] [--cold-runs N] [--uncached-runs N]

Every measurement runs in a fresh subprocess (peak RSS = that process's ru_maxrss from wait4), with
PyTorch and onnxruntime at the same thread count (one per physical core, sdport's default), after
a warm-up, median of --runs runs, and starts with the files it reads in the page cache (read just
before, but for --uncached-runs). Ratios are sdport / reference from this same run: the machine
is shared and noisy, so compare ratios, not absolute times across runs.

  unet step     one UNet evaluation, batch 2 (classifier-free guidance), fp32 (and int8), per size;
                with --step-rounds N, N processes per side, started in turn, and the ratio per round
  text-to-image --steps steps at --image-size: cold = process start to PNG written (imports and
                sessions included), warm = the median of --warm-runs more images in the same
                process; their difference is what starting cold costs. With --cold-runs N, cold
                is the median of N processes per side, started in turn (diffusers, sdport fp32,
                int8, diffusers, ...). With --uncached-runs N, N more cold processes per side
                start with their model files (and sdport's session cache entries) dropped from
                the kernel's page cache, so that their weights come from disk, as after a reboot.
                Beside both, the median system CPU time of those processes (page faults, page-cache
                fills)
  memory        peak RSS of each process; sdport's low_memory mode (one component at a time);
                the peak of its anonymous part (RssAnon: weights memory-mapped from a file are not
                in it, and the kernel can reclaim those pages under pressure)
  overhead      scheduler + Python time per step (the denoising loop outside the UNet), as a
                share of the step, for sdport and for diffusers: the median over the warm images
  install       a fresh venv with sdport's base install vs one that can run diffusers (cached)
  reference     PyTorch's step (each size) and diffusers' cold image once more with glibc keeping
                freed memory (MALLOC_KEEPS_FREED): how much of the reference's time is its tensors
                page-faulted in again
  capped        one more cold image per side, files read from disk, under a memory cap (a cgroup
                limit, --memory-cap x diffusers' peak RSS; benchmarks/memory_cap.py): sdport by
                default and in low_memory mode, and whether each completes or is killed
  int8 error    the int8 folder's image against the fp32 folder's, same seed
  fresh memory  what a process's first writes to 1 GB cost on this machine, after a pause and just
                after another process freed memory: on a VM whose host takes back free memory, the
                first kind is many times slower, and every cold start pays it for what it takes

The SD 1.5-sized model (random weights, benchmarks/sd15_model.py) is built and exported once and
cached outside the repository. With --model sd15, each measurement takes /tmp/sd15.lock (flock) so
that no two SD 1.5-sized runs on a shared machine overlap; don't wrap this script in flock.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0
GUIDANCE = 7.5


# --- workers: each runs in its own process and prints one JSON line ----------------------------


def _threads() -> int:
    from sdport.runtime.options import physical_cores

    return physical_cores()


def _torch_setup():
    import torch

    torch.set_num_threads(_threads())  # the same count as onnxruntime's intra-op pool
    torch.set_grad_enabled(False)
    return torch


def run_times(step: Callable[[], object], count: int) -> list[float]:
    """Seconds taken by each of `count` calls of `step` (callers treat the first as a warm-up)."""
    times = []
    for _ in range(count):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def worker_unet_torch(model: str, size: int, runs: int) -> dict:
    torch = _torch_setup()
    from diffusers import UNet2DConditionModel

    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
    load = time.perf_counter() - t0
    with torch.inference_mode():
        times = run_times(torch_unet_step(unet, size), runs + 1)
    return {"load_s": load, "warmup_s": times[0], "times_s": times[1:]}


def torch_unet_step(unet, size: int) -> Callable[[], object]:
    """One batch-2 evaluation (classifier-free guidance) of diffusers' `unet` at `size` pixels, on
    fixed random inputs made as guidance makes them (and as sdport's, quantize.unet_feeds): the
    same latents twice, two text embeddings."""
    import torch

    g = torch.Generator().manual_seed(0)
    latent = size // 8
    sample = torch.randn(1, unet.config.in_channels, latent, latent, generator=g).repeat(2, 1, 1, 1)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    timestep = torch.tensor(500.0)
    return lambda: unet(sample, timestep, encoder_hidden_states=hidden)


def worker_unet_sdport(folder: str, size: int, runs: int) -> dict:
    from sdport.export.quantize import unet_feeds
    from sdport.models.manifest import read_manifest
    from sdport.runtime.graph_files import check_graph_files
    from sdport.runtime.sessions import Graph

    manifest = read_manifest(Path(folder))
    spec = manifest.graphs["unet"]
    t0 = time.perf_counter()
    graph = Graph("unet", check_graph_files(Path(folder), spec.file), "cpu", spec.optimization == "ort")
    create = time.perf_counter() - t0
    feeds = unet_feeds(manifest, size // manifest.vae_scale)
    times = run_times(lambda: graph.run(feeds), runs + 1)
    return {"create_s": create, "warmup_s": times[0], "times_s": times[1:]}


def worker_t2i_diffusers(model: str, size: int, steps: int, png: str, warm: int, device: str = "cpu",
                         fp16: bool = False) -> dict:
    torch = _torch_setup()
    from diffusers import StableDiffusionPipeline

    t0 = time.perf_counter()
    dtype = torch.float16 if fp16 else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    ready_at = time.time()
    # The same overhead sdport's row measures: the denoising loop's time outside the UNet, from
    # the first UNet call to the VAE decode, so that the set-up before the loop is not counted
    # (sdport's row, too, starts at its first UNet run). On a GPU, time outside forward includes
    # waiting for it.
    loop = {"unet_s": 0.0, "evals": 0, "start": None, "end": None}
    loops = []  # each image's: loop_s, unet_s, evals
    forward, decode = pipe.unet.forward, pipe.vae.decode

    def timed_forward(*args, **kwargs):
        t = time.perf_counter()
        loop["start"] = loop["start"] or t
        try:
            return forward(*args, **kwargs)
        finally:
            loop["unet_s"] += time.perf_counter() - t
            loop["evals"] += 1

    def timed_decode(*args, **kwargs):
        loop["end"] = loop["end"] or time.perf_counter()
        return decode(*args, **kwargs)

    pipe.unet.forward, pipe.vae.decode = timed_forward, timed_decode

    def one(path: str) -> float:
        loop.update(unet_s=0.0, evals=0, start=None, end=None)
        t = time.perf_counter()
        image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                     generator=torch.Generator(device).manual_seed(SEED)).images[0]
        loops.append({"loop_s": loop["end"] - loop["start"], "unet_s": loop["unet_s"], "evals": loop["evals"]})
        image.save(path)  # to a PIL image and PNG: the pipeline's output has crossed to the host
        return time.perf_counter() - t

    first = one(png)
    png_at = time.time()
    result = {"load_s": load, "ready_at": ready_at, "first_s": first, "png_at": png_at,
              **warm_images(lambda: one(png + ".warm.png"), warm)}
    return {**result, **overhead(loops)}


def overhead(loops: list[dict]) -> dict:
    """The denoising loops' time outside the UNet's runs, per evaluation and as a share of a step
    (the loop's time per evaluation): medians over the warm images' loops (the cold image's alone
    where there is no warm one), as one loop's is noisy (the tiny model's: 32-40 us per step across
    eight images of one process). The share is the one median over the other, so that the table's
    "X ms = Y% of a Z ms step" holds as printed.
    `loops`: one dict per image, in order, with loop_s, unet_s, evals (sdport's: graph_s too)."""
    timed = loops[1:] or loops

    def per_eval(start: str, end: str) -> float:
        return median([(o[end] - o[start]) / max(o["evals"], 1) for o in timed])

    per_step = per_eval("unet_s", "loop_s")
    step = median([o["loop_s"] / max(o["evals"], 1) for o in timed])
    result = {"overhead_s_per_step": per_step, "overhead_share": per_step / step if step else 0.0,
              "step_s": step, "overhead_loops": len(timed)}
    if all("graph_s" in o for o in timed):
        result.update(graph_io_s_per_step=per_eval("unet_s", "graph_s"),
                      loop_python_s_per_step=per_eval("graph_s", "loop_s"))
    return result


def worker_t2i_sdport(folder: str, size: int, steps: int, png: str, warm: int, low_memory: bool,
                      provider: str = "cpu", cuda_graphs: bool = False) -> dict:
    import numpy as np
    import onnxruntime as ort

    from sdport.runtime import images as imgs
    from sdport.runtime.pipeline import Pipeline
    from sdport.runtime.sessions import Graph

    # Time inside onnxruntime during denoising: the rest of a step is scheduler + Python overhead.
    # (CUDA runs go through run_with_iobinding, CPU ones through run.) Where the loop runs the
    # UNet through Graph.run (on a GPU; on CPU the compiled loop calls onnxruntime itself), its
    # time around onnxruntime splits that overhead: its casts and host <-> device copies, and the
    # rest of the loop. The loop is timed from its first UNet run, as diffusers' from its first
    # UNet call: the set-up before it (the schedule, the session) is not counted against either side.
    inside = {"on": False, "times": [], "graph_times": [], "first_run_at": None}

    def timed(run, times: list[float]):
        """`run`, with each call's time appended to `times` while a denoising loop runs."""
        def timed_run(self, *args, **kwargs):
            t = time.perf_counter()
            if inside["on"] and inside["first_run_at"] is None:
                inside["first_run_at"] = t
            try:
                return run(self, *args, **kwargs)
            finally:
                if inside["on"]:
                    times.append(time.perf_counter() - t)
        return timed_run

    ort.InferenceSession.run = timed(ort.InferenceSession.run, inside["times"])
    ort.InferenceSession.run_with_iobinding = timed(ort.InferenceSession.run_with_iobinding, inside["times"])
    Graph.run = timed(Graph.run, inside["graph_times"])
    denoise = Pipeline._denoise
    loops = []

    def timed_denoise(self, *args, **kwargs):
        inside["times"].clear()
        inside["graph_times"].clear()
        inside["first_run_at"] = None
        inside["on"] = True
        entered = time.perf_counter()
        try:
            return denoise(self, *args, **kwargs)
        finally:
            start = inside["first_run_at"] or entered  # no run: it failed before the first
            loops.append({"loop_s": time.perf_counter() - start, "unet_s": sum(inside["times"]),
                          "evals": len(inside["times"]), "eval_times_s": list(inside["times"]),
                          **({"graph_s": sum(inside["graph_times"])} if inside["graph_times"] else {})})
            inside["on"] = False

    Pipeline._denoise = timed_denoise
    t0 = time.perf_counter()
    pipe = Pipeline.load(folder, provider=provider, low_memory=low_memory, cuda_graphs=cuda_graphs)
    load = time.perf_counter() - t0
    ready_at = time.time()

    def one(path: str) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        pixels = pipe.generate(PROMPT, steps=steps, guidance=GUIDANCE, width=size, height=size, seed=SEED,
                               output="np", progress=False)
        imgs.to_pil(pixels)[0].save(path)
        return time.perf_counter() - t, pixels

    first, pixels = one(png)
    png_at = time.time()
    np.save(png + ".npy", pixels)
    result = {"load_s": load, "ready_at": ready_at, "first_s": first, "png_at": png_at,
              **warm_images(lambda: one(png + ".warm.png")[0], warm)}
    # Each UNet run of the last image's loop: a slow first one (the arena growing again) shows here.
    return {**result, "eval_times_s": loops[-1]["eval_times_s"], **overhead(loops)}


def worker_first_touch(mb: int) -> dict:
    """Writes `mb` MB of memory this process has not touched before; touch_s: how long that took,
    nearly all of it page faults."""
    import numpy as np

    t = time.perf_counter()
    np.ones(mb << 18, dtype=np.float32)  # 4-byte floats: mb << 20 bytes
    return {"touch_s": time.perf_counter() - t}


def worker_load_sdport(folder: str, provider: str = "cpu") -> dict:
    """Loads every session once (this builds the pre-optimized cache the first time)."""
    from sdport.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    Pipeline.load(folder, provider=provider)
    return {"load_s": time.perf_counter() - t0}


WORKERS = {name[len("worker_"):]: fn for name, fn in globals().items() if name.startswith("worker_")}


# --- the parent: spawn, lock, collect ----------------------------------------------------------


@contextlib.contextmanager
def _lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_start_times(r: dict) -> dict:
    """A text-to-image worker's result with cold_s (process start to PNG written) and ready_s
    (process start to pipeline loaded: interpreter, imports and loading)."""
    r["cold_s"] = r["png_at"] - r["started_at"]
    r["ready_s"] = r["ready_at"] - r["started_at"]
    return r


def warm_images(make: Callable[[], float], count: int) -> dict:
    """`count` more images in the process that made the cold one: warm_s (their median; None
    for none) and warm_runs_s."""
    times = [make() for _ in range(count)]
    return {"warm_s": median(times) if times else None, "warm_runs_s": times}


def spawn(worker: str, lock: str | None, env: dict | None = None, script: str = __file__, **kwargs) -> dict:
    """Runs one worker of `script` in a fresh Python; adds wall_s and started_at (the worker adds
    its peak RSS)."""
    command = worker_command(worker, script, **kwargs)
    with _lock(lock):
        started = time.time()
        process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
        wall = time.time() - started
    if process.returncode != 0:
        raise RuntimeError(f"{worker} {kwargs} failed:\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    result.update(wall_s=wall, started_at=started)
    return result


def worker_command(worker: str, script: str = __file__, **kwargs) -> list[str]:
    """The command line that runs one worker of `script` in a fresh Python."""
    return [sys.executable, str(Path(script).resolve()), "--worker", worker, "--args", json.dumps(kwargs)]


def peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM, not ru_maxrss (which on Linux starts from the
    parent's peak at fork, so every worker would report at least its parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # KiB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden arguments `spawn` runs a script's worker with."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)


@contextlib.contextmanager
def sampled_peak(read: Callable[[], float], every_s: float) -> Iterator[dict]:
    """Calls `read` in a thread every `every_s` seconds while the block runs (and once at each end);
    the yielded dict holds "start" and, after the block, "peak"."""
    import threading

    sampled = {"start": read()}
    peak = [sampled["start"]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            peak[0] = max(peak[0], read())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield sampled
    finally:
        done.set()
        thread.join()
        sampled["peak"] = max(peak[0], read())


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def anonymous_peak(result: dict, every_s: float = 0.02):
    """Samples this process's anonymous resident memory (RssAnon: what the kernel can't drop and
    re-read from a file, unlike memory-mapped weights) and records its peak as peak_anon_mb."""
    if not Path("/proc/self/status").exists():  # not Linux
        yield
        return
    with sampled_peak(_rss_anon_kib, every_s) as sampled:
        yield
    result["peak_anon_mb"] = sampled["peak"] / 1024  # KiB


def run_worker(workers: dict, args: argparse.Namespace) -> bool:
    """In a process `spawn` started, runs the worker named by --worker, prints its result as one JSON
    line and returns True; otherwise returns False."""
    if not args.worker:
        return False
    memory: dict = {}
    with anonymous_peak(memory):
        result = workers[args.worker](**json.loads(args.args))
    result.update(memory, peak_rss_mb=peak_rss_mb(), **cpu_and_faults())  # imports and sessions included
    print(json.dumps(result))
    return True


def cpu_and_faults() -> dict:
    """This process's CPU time so far, user and system, and its page faults: minor (a page mapped
    or zeroed, no read) and major (read from disk). System time is mostly the faults and, starting
    from disk, filling the page cache."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": usage.ru_utime, "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "major_faults": usage.ru_majflt}


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- models ------------------------------------------------------------------------------------


def prepare(model: str, onnx: Path | None, int8: Path | None, want_int8: bool) -> tuple[Path, Path, Path | None]:
    """(diffusers folder, fp32 sdport folder, int8 sdport folder or None), built once and cached."""
    from sdport.cache import cache_root

    if model == "tiny":
        root = cache_root() / "bench-tiny"
        diffusers_dir = root / "diffusers"
        if not (diffusers_dir / "model_index.json").exists():
            from sdport.export.tiny import write_tiny_model

            write_tiny_model(diffusers_dir)
    else:
        from sd15_model import build_sd15_random

        diffusers_dir = build_sd15_random()
        root = cache_root() / "bench-sd15"
    onnx = onnx or root / "onnx"
    if not (onnx / "sdport.json").exists():
        print(f"exporting {diffusers_dir} -> {onnx} (once)", file=sys.stderr)
        from sdport.export.folder import export_model

        export_model(diffusers_dir, onnx)
    if not want_int8:
        return diffusers_dir, onnx, None
    int8 = int8 or root / "int8"
    if not (int8 / "sdport.json").exists():
        print(f"quantizing {onnx} -> {int8} (once)", file=sys.stderr)
        from sdport.export.quantize import quantize_model

        quantize_model(onnx, int8)
    return diffusers_dir, onnx, int8


# --- the run -----------------------------------------------------------------------------------


def _cpu_name() -> str:
    """The CPU's model name, with its family/model numbers and widest vector extension where
    /proc/cpuinfo gives them: ratios to PyTorch move with the CPU generation, and a name like
    "AMD EPYC" covers 2-core machines whose fp32 products ran at 196 and at 436 GFLOP/s."""
    from sdport.runtime.graph_cache import cpu_info

    fields = cpu_info()
    if fields is None:
        return platform.processor()
    flags = set(fields.get("flags", "").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags), None)
    details = [f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else None, isa]
    name = fields.get("model name", platform.processor())
    return f"{name} ({', '.join(d for d in details if d)})" if any(details) else name


def machine() -> dict:
    cpu = _cpu_name()
    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "diffusers"):  # not imported: the parent stays small
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    mem = 0
    with contextlib.suppress(OSError, StopIteration):
        mem = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines()
                       if l.startswith("MemTotal"))) / 1024 / 1024
    return {"cpu": cpu, "threads": _threads(), "ram_gb": round(mem, 1), "os": platform.platform(),
            "cuda": "none on this machine (no GPU table)", **versions}


def bench(args) -> dict:
    lock = args.lock if args.model == "sd15" else None
    diffusers_dir, onnx, int8 = prepare(args.model, args.onnx, args.int8, not args.no_int8)
    folders = {"fp32": onnx, **({"int8": int8} if int8 else {})}
    out_dir = Path(tempfile.gettempdir()) / f"sdport-bench-{args.model}-images"  # PNGs and arrays: not in the repo
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "folders": {"diffusers": str(diffusers_dir), **{k: str(v) for k, v in folders.items()}},
              "steps": args.steps, "image_size": args.image_size, "runs": args.runs}

    def say(message: str) -> None:  # and keep what is measured so far, should a later stage fail
        print(message, file=sys.stderr, flush=True)
        args.out.with_suffix(".partial.json").write_text(json.dumps(result, indent=2) + "\n")

    result["machine"]["memory_first_touch"] = memory_first_touch(lock)
    touch = result["machine"]["memory_first_touch"]
    say(f"first writes to {touch['mb']} MB: {touch['after_pause_s']:.2f} s after a pause, "
        f"{touch['just_freed_s']:.2f} s just freed")

    # 0. the first-ever load builds the pre-optimized session cache; later loads use it.
    result["first_load"] = {}
    for name, folder in folders.items():
        result["first_load"][name] = spawn("load_sdport", lock, folder=str(folder))
        say(f"first load {name}: {result['first_load'][name]['load_s']:.1f} s (builds the session cache if missing)")

    # 1. UNet step, batch 2.
    result["unet"] = {}

    def unet_step(name: str, size: int, env: dict | None = None) -> dict:
        """One process's UNet steps: PyTorch's ("torch") or sdport's on folders[name]."""
        if name == "torch":
            read_into_page_cache(diffusers_dir)
            return spawn("unet_torch", lock, env=env, model=str(diffusers_dir), size=size, runs=args.runs)
        read_into_page_cache(folders[name])
        return spawn("unet_sdport", lock, env=env, folder=str(folders[name]), size=size, runs=args.runs)

    def unet_step_variant(name: str, size: int, env: dict) -> dict:
        """One more process of a side's UNet steps, under `env`, with their median_s."""
        r = unet_step(name, size, env)
        r["median_s"] = median(r["times_s"])
        return r

    for size in args.sizes:
        row = step_rounds(["torch", *folders], functools.partial(unet_step, size=size), args.step_rounds)
        if size == args.sizes[0]:
            row["fp32_no_cache"] = unet_step_variant("fp32", size, {"SDPORT_ORT_CACHE": "0"})
        row["torch_malloc_keeps"] = unet_step_variant("torch", size, MALLOC_KEEPS_FREED)
        result["unet"][str(size)] = row
        say(f"unet {size}px: " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in row.items()))

    # 2. text-to-image, cold and warm; low_memory; without the session cache.
    def image(folder: Path | None, png: str, warm: int = 0, low_memory: bool = False, env: dict | None = None,
              from_disk: bool = False) -> dict:
        """One text-to-image process: diffusers (folder None) or sdport on `folder`; its files are
        read into the page cache first, unless `from_disk` (uncached_rounds has dropped them)."""
        if not from_disk:
            read_into_page_cache(diffusers_dir if folder is None else folder)
        common = {"size": args.image_size, "steps": args.steps, "png": str(out_dir / png), "warm": warm}
        if folder is None:
            r = spawn("t2i_diffusers", lock, env=env, model=str(diffusers_dir), **common)
        else:
            r = spawn("t2i_sdport", lock, env=env, folder=str(folder), low_memory=low_memory, **common)
        return add_start_times(r)

    t2i = {"diffusers": image(None, "diffusers.png", args.warm_runs)}
    for name, folder in folders.items():
        t2i[name] = image(folder, f"sdport-{name}.png", args.warm_runs)
    t2i["fp32_low_memory"] = image(onnx, "sdport-fp32-low-memory.png", low_memory=True)
    if int8:
        t2i["int8_low_memory"] = image(int8, "sdport-int8-low-memory.png", low_memory=True)
    t2i["fp32_no_cache"] = image(onnx, "sdport-fp32-no-cache.png", env={"SDPORT_ORT_CACHE": "0"})
    t2i["diffusers_malloc_keeps"] = image(None, "diffusers-malloc-keeps.png", env=MALLOC_KEEPS_FREED)
    cold_rounds(t2i, {"diffusers": None, **folders}, image, args.cold_runs)
    if args.uncached_runs:
        uncached_rounds(t2i, {"diffusers": diffusers_dir, **folders}, image, args.uncached_runs)
    result["t2i"] = t2i
    say("text-to-image: " + ", ".join(f"{k} cold {v['cold_s']:.1f} s" for k, v in t2i.items()))
    if args.memory_cap:
        common = {"size": args.image_size, "steps": args.steps, "warm": 0}
        sides = {"diffusers": (diffusers_dir, worker_command("t2i_diffusers", model=str(diffusers_dir),
                                                             png=str(out_dir / "diffusers-capped.png"), **common))}
        for name, folder, low_memory in [("fp32", onnx, False), ("fp32_low_memory", onnx, True),
                                         *([("int8_low_memory", int8, True)] if int8 else [])]:
            sides[name] = (folder, worker_command("t2i_sdport", folder=str(folder), low_memory=low_memory,
                                                  png=str(out_dir / f"sdport-{name}-capped.png"), **common))
        result["capped"] = []
        for fraction in args.memory_cap:
            result["capped"].append(capped_images(fraction, t2i["diffusers"]["peak_rss_mb"], sides, lock))
            say(f"under a memory cap of {fraction}x: " + json.dumps(
                {k: v.get("cold_s", v["returncode"]) for k, v in result["capped"][-1].get("sides", {}).items()}))

    # 3. int8 image error against fp32, same seed and noise ([0, 1] pixels).
    if int8:
        import numpy as np

        a = np.load(out_dir / "sdport-fp32.png.npy")
        b = np.load(out_dir / "sdport-int8.png.npy")
        mse = float(np.mean((a - b) ** 2))
        result["int8_image_error"] = {"max_abs": float(np.max(np.abs(a - b))), "mean_abs": float(np.mean(np.abs(a - b))),
                                      "psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")}

    # 4. install size (cached: creating two venvs takes minutes).
    if not args.skip_install:
        from install_size import measure

        result["install"] = measure(args.out.parent / "install.json")
    result["ratios"] = ratios(result)
    return result


def step_rounds(sides: list[str], measure: Callable[[str], dict], rounds: int) -> dict[str, dict]:
    """`rounds` UNet-step processes per side, one of each in turn (PyTorch first), so that a slow
    spell of the machine falls on all alike: each side's first process's result, with times_s
    every round's runs, median_s their median, and for sdport's sides round_ratios (the ratio of
    each round's median to PyTorch's in the same round). On these VMs one process's steps can run
    20% slower than the next one's, the same graph and weights."""
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name in sides:
            results[name].append(measure(name))
    row = {}
    for name, runs in results.items():
        row[name] = {**runs[0], "times_s": [t for r in runs for t in r["times_s"]],
                     "round_medians_s": [median(r["times_s"]) for r in runs]}
        row[name]["median_s"] = median(row[name]["times_s"])
        if name != sides[0]:
            row[name]["round_ratios"] = [a / b for a, b in zip(row[name]["round_medians_s"],
                                                                row[sides[0]]["round_medians_s"])]
    return row


def cold_rounds(t2i: dict, sides: dict[str, Path | None], image: Callable[[Path | None, str], dict],
                rounds: int) -> None:
    """rounds - 1 more cold images for each of `sides` (t2i names -> what `image` runs), one of
    each in turn, so that a slow spell of the machine falls on all alike. cold_s becomes the
    median of the rounds (cold_runs_s lists them, cold_system_s their system CPU), and sdport's
    cold_ratios the per-round ratios."""
    runs = {name: [t2i[name]] for name in sides}
    for _ in range(rounds - 1):
        for name, folder in sides.items():
            runs[name].append(image(folder, f"{name}-cold.png"))
    rounds_into(t2i, runs, "cold")


# glibc told to keep what is freed for reuse instead of handing large blocks back to the system:
# PyTorch takes its CPU tensors from malloc with no cache of its own, so by default each large one
# is page-faulted in again at every layer of every step. A reference measured this way too shows
# how much of PyTorch's time those faults are (SD 1.5-sized 512 px step on the Zen 5, 2026-11-29:
# 5.86-5.91 s against 6.52-6.57 s, system CPU 0.8-0.9 s against 4.9-5.1 s).
MALLOC_KEEPS_FREED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                      "MALLOC_TOP_PAD_": str(1 << 28)}

# Seconds between dropping a side's files and starting it: a cold start finds the memory those
# pages held freed a while before, not just now. On these VMs memory freed moments ago is far
# faster to take again (memory_first_touch), which would flatter whichever side reads more from
# disk.
UNCACHED_PAUSE_S = 10
FIRST_TOUCH_MB = 1024


def memory_first_touch(lock: str | None) -> dict:
    """What writing FIRST_TOUCH_MB of fresh memory costs a process on this machine: after_pause_s
    when no process has freed memory for UNCACHED_PAUSE_S, just_freed_s right after another process
    freed as much. On a VM whose host takes back the guest's free memory (these: 2026-11-29, 4 GB
    took 8.8-9.2 s after a pause and 0.27 s just freed) each page's first write waits for the host,
    in the guest's system time; every cold start pays it for the memory it takes, both sides alike,
    and more the longer the machine sat idle before."""
    time.sleep(UNCACHED_PAUSE_S)
    after_pause = spawn("first_touch", lock, mb=FIRST_TOUCH_MB)
    just_freed = spawn("first_touch", lock, mb=FIRST_TOUCH_MB)
    return {"mb": FIRST_TOUCH_MB, "after_pause_s": after_pause["touch_s"], "just_freed_s": just_freed["touch_s"],
            "after_pause_system_s": after_pause["system_s"], "just_freed_system_s": just_freed["system_s"]}


def uncached_rounds(t2i: dict, sides: dict[str, Path], image: Callable[..., dict],
                    rounds: int) -> None:
    """`rounds` cold images per side (t2i names -> model folder), in turn, each started with the
    side's files out of the page cache: uncached_s (their median), uncached_runs_s,
    uncached_system_s, and for sdport uncached_ratios per round."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, folder in sides.items():
            drop_from_page_cache(folder)
            time.sleep(UNCACHED_PAUSE_S)
            runs[name].append(image(None if name == "diffusers" else folder, f"{name}-uncached.png",
                                    from_disk=True))
    rounds_into(t2i, runs, "uncached")


def rounds_into(t2i: dict, runs: dict[str, list[dict]], kind: str) -> None:
    """Each side's rounds of cold images (t2i names -> their processes' results, in round order)
    into t2i: {kind}_runs_s (each process's start to PNG), {kind}_s (their median),
    {kind}_system_s (each process's system CPU) and, for sdport's sides, {kind}_ratios per round."""
    for name, results in runs.items():
        times = [r["cold_s"] for r in results]
        t2i[name].update({f"{kind}_runs_s": times, f"{kind}_s": median(times),
                          f"{kind}_system_s": [r.get("system_s") for r in results]})
    for name in runs:
        if name != "diffusers":
            t2i[name][f"{kind}_ratios"] = [a / b for a, b in zip(t2i[name][f"{kind}_runs_s"],
                                                                  t2i["diffusers"][f"{kind}_runs_s"])]


def capped_images(fraction: float, reference_mb: float, sides: dict[str, tuple[Path, list[str]]],
                  lock: str | None) -> dict:
    """One cold image per side (name -> (its model folder, its worker's command)) under a memory
    cap of `fraction` x reference_mb (diffusers' peak RSS), each started with its files out of the
    page cache, so that the cap binds on them too (see memory_cap): {"fraction", "limit_mb",
    "sides": {name: memory_cap.run_capped's result, with the worker's (cold_s, ...) where it
    completed}}, or {"unavailable": why} where no memory cgroup can be made."""
    from memory_cap import run_capped, unavailable

    why = unavailable()
    if why:
        return {"unavailable": why}
    limit = int(fraction * reference_mb)
    runs = {}
    for name, (folder, command) in sides.items():
        drop_from_page_cache(folder)
        time.sleep(UNCACHED_PAUSE_S)
        with _lock(lock):
            r = run_capped(command, limit)
        stdout = r.pop("stdout")
        if r["completed"]:
            r.update(add_start_times({**json.loads(stdout.strip().splitlines()[-1]), "started_at": r["started_at"]}))
        runs[name] = r
    return {"fraction": fraction, "limit_mb": limit, "sides": runs}


def model_files(folder: Path) -> list[Path]:
    """The files of `folder` and of the session-cache entries made from it: what a run on it reads."""
    from sdport.runtime.graph_cache import cache_entry_source, ort_cache_dir

    files = [p for p in folder.rglob("*") if p.is_file()]
    cache = ort_cache_dir()
    for entry in cache.iterdir() if cache is not None and cache.is_dir() else ():
        made_from = cache_entry_source(entry)
        if made_from is not None and Path(made_from["source"]).resolve().is_relative_to(folder.resolve()):
            files += [p for p in entry.iterdir() if p.is_file()]
    return files


def drop_from_page_cache(folder: Path) -> None:
    """Drops model_files(folder) from the kernel's page cache (posix_fadvise DONTNEED: only clean
    pages go, nothing is lost)."""
    for file in model_files(folder):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(folder: Path) -> None:
    """Drops model_files(folder) from the page cache and reads them once, in order, so that the
    next process finds them cached, and cached alike whatever an earlier process left.

    The kernel drops large files it has not read for a while (within the hour on these VMs): a
    measurement that is meant to start with its files cached would otherwise read some of them
    from disk, the more the longer since the side last ran (the SD 1.5-sized UNet's session without
    the session cache took 5.35 s two hours after its folder was last read, 1.08 s right after the
    export). Plain reads, as `cat` would, cache the files in large folios; posix_fadvise(WILLNEED),
    sdport's read-ahead, would cache them in 4 KB pages, which a process mapping them then pays for
    in page faults and at munmap (the state sdport's own first start from disk leaves, but not
    diffusers': a one-step 512 px image from cached files took 10.7-11.7 s in it against
    9.3-10.1 s; see sdport/runtime/prefetch.py). Pages already cached stay as they are when read,
    hence the drop first."""
    drop_from_page_cache(folder)
    buffer = bytearray(16 << 20)
    for file in model_files(folder):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def ratios(r: dict) -> dict:
    """sdport / reference for every target (below 1 is better for all of them)."""
    out = {}
    for size, row in r["unet"].items():
        for name in ("fp32", "int8"):
            if name in row:
                out[f"unet_{size}_{name}_time"] = row[name]["median_s"] / row["torch"]["median_s"]
                out[f"unet_{size}_{name}_rss"] = row[name]["peak_rss_mb"] / row["torch"]["peak_rss_mb"]
    ref = r["t2i"]["diffusers"]
    for name, t in r["t2i"].items():
        if name.startswith("diffusers"):  # the reference, and its variants
            continue
        out[f"t2i_{name}_cold"] = t["cold_s"] / ref["cold_s"]
        if "uncached_s" in t:
            out[f"t2i_{name}_uncached"] = t["uncached_s"] / ref["uncached_s"]
        out[f"t2i_{name}_ready"] = t["ready_s"] / ref["ready_s"]
        if t.get("warm_s"):
            out[f"t2i_{name}_warm"] = t["warm_s"] / ref["warm_s"]
        out[f"t2i_{name}_rss"] = t["peak_rss_mb"] / ref["peak_rss_mb"]
    if "install" in r:
        out["install_size"] = r["install"]["ratio"]
    return out


def first_touch_line(info: dict) -> list[str]:
    """The machine's cost of fresh memory (memory_first_touch) as a line under the table's title."""
    touch = info.get("memory_first_touch")
    if touch is None:  # JSON of earlier runs
        return []
    return [f"Fresh memory: a process's first writes to {touch['mb']} MB took {touch['after_pause_s']:.2f} s "
            f"after {UNCACHED_PAUSE_S} s with no memory freed, {touch['just_freed_s']:.2f} s right after "
            f"another process freed as much."]


def capped_lines(capped: dict) -> list[str]:
    """The table's rows for the images under one memory cap (capped_images)."""
    if "sides" not in capped:
        return [f"| under a memory cap | not measured: {capped['unavailable']} | | | | | |"]
    runs = capped["sides"]

    def outcome(name: str) -> str:
        run = runs.get(name)
        if run is None:
            return "-"
        if run["completed"]:
            return f"{run['cold_s']:.1f}"
        how = "killed (out of memory)" if run["killed_by_oom"] else f"failed (exit status {run['returncode']})"
        return f"{how} after {run['wall_s']:.0f} s"

    def ratio(name: str) -> str:
        both = name in runs and runs[name]["completed"] and runs["diffusers"]["completed"]
        return f"{runs[name]['cold_s'] / runs['diffusers']['cold_s']:.2f}x" if both else "-"

    label = (f"under a memory cap of {capped['limit_mb']} MB ({capped['fraction']:.2f}x diffusers' peak RSS), "
             f"files read from disk: process start to PNG (s)")
    return [f"| {label} | {outcome('diffusers')} | {outcome('fp32')} | {ratio('fp32')} | | | |",
            f"|   same, sdport in low_memory mode (s) | {outcome('diffusers')} | {outcome('fp32_low_memory')} | "
            f"{ratio('fp32_low_memory')} | {outcome('int8_low_memory')} | {ratio('int8_low_memory')} | |"]


def table(r: dict) -> str:
    """Markdown table: each row a measurement, reference and sdport side by side, with ratios."""
    lines = [f"Model: {r['model']}; {r['machine']['cpu']}, {r['machine']['threads']} threads for both; "
             f"{r['date']}; median of {r['runs']} runs after a warm-up; text-to-image {r['steps']} steps "
             f"at {r['image_size']}x{r['image_size']}, guidance {GUIDANCE}.", *first_touch_line(r['machine']), "",
             "| measurement | diffusers / PyTorch | sdport fp32 | ratio | sdport int8 | ratio | target |",
             "|---|---|---|---|---|---|---|"]

    def cell(value, fmt):
        return "-" if value is None else fmt.format(value)

    def row(label, ref, fp32, int8, fmt, target):
        ratio = lambda v: cell(v / ref if (v is not None and ref) else None, "{:.2f}x")  # noqa: E731
        lines.append(f"| {label} | {cell(ref, fmt)} | {cell(fp32, fmt)} | {ratio(fp32)} | {cell(int8, fmt)} | "
                     f"{ratio(int8)} | {target} |")

    def spread(measured: dict, name: str, key: str) -> str:
        """The range of the per-round ratios measured[name][key], or "-" for a side not measured."""
        return f"{min(measured[name][key]):.2f}x-{max(measured[name][key]):.2f}x" if name in measured else "-"

    get = lambda d, *keys: (d.get(keys[0]) if len(keys) == 1 else get(d.get(keys[0], {}), *keys[1:])) if d else None  # noqa: E731
    for size, u in r["unet"].items():
        rounds = len(u["torch"].get("round_medians_s", [None]))  # JSON of earlier runs has one, unlisted
        row(f"UNet step, batch 2, {size}px (s)" + (f", median of {rounds} processes' runs" if rounds > 1 else ""),
            u["torch"]["median_s"], u["fp32"]["median_s"], get(u, "int8", "median_s"), "{:.3f}", "<= 0.67x")
        if rounds > 1:
            lines.append(f"|   ratio in each round (PyTorch, then sdport, {rounds} rounds) | | | "
                         f"{spread(u, 'fp32', 'round_ratios')} | | {spread(u, 'int8', 'round_ratios')} | |")
        if "torch_malloc_keeps" in u:  # JSON of earlier runs has none
            row("  against PyTorch with glibc keeping freed memory (MALLOC_KEEPS_FREED) (s)",
                u["torch_malloc_keeps"]["median_s"], u["fp32"]["median_s"], get(u, "int8", "median_s"), "{:.3f}", "")
        row(f"UNet peak RSS, {size}px (MB)", u["torch"]["peak_rss_mb"], u["fp32"]["peak_rss_mb"],
            get(u, "int8", "peak_rss_mb"), "{:.0f}", "")
    t = r["t2i"]
    row("UNet session create / torch load (s)", r["unet"][next(iter(r["unet"]))]["torch"]["load_s"],
        r["unet"][next(iter(r["unet"]))]["fp32"]["create_s"], get(r["unet"][next(iter(r["unet"]))], "int8", "create_s"),
        "{:.2f}", "")
    row("  same, session cache off (s)", None, r["unet"][next(iter(r["unet"]))]["fp32_no_cache"]["create_s"], None,
        "{:.2f}", "")
    warm_runs = len(t["fp32"].get("warm_runs_s", [None]))  # JSON of earlier runs has one, unlisted
    row("text-to-image warm (s)" + (f", median of {warm_runs}" if warm_runs > 1 else ""), t["diffusers"]["warm_s"],
        t["fp32"]["warm_s"], get(t, "int8", "warm_s"), "{:.1f}", "<= 0.77x")
    cold_runs = len(t["fp32"].get("cold_runs_s", [None]))
    row("text-to-image cold, process start to PNG (s)" + (f", median of {cold_runs}" if cold_runs > 1 else ""),
        t["diffusers"]["cold_s"], t["fp32"]["cold_s"], get(t, "int8", "cold_s"), "{:.1f}", "<= 0.5x")

    def system_cpu(kind: str) -> None:  # JSON of earlier runs has none
        median_of = lambda name: median(t[name][f"{kind}_system_s"]) if f"{kind}_system_s" in t.get(name, {}) else None  # noqa: E731
        if median_of("fp32") is not None:
            row("  system CPU of those processes (page faults, page-cache fills) (s), median", median_of("diffusers"),
                median_of("fp32"), median_of("int8"), "{:.1f}", "")

    if cold_runs > 1:
        lines.append(f"|   ratio in each round (diffusers, then sdport, {cold_runs} rounds) | | | "
                     f"{spread(t, 'fp32', 'cold_ratios')} | | {spread(t, 'int8', 'cold_ratios')} | |")
    system_cpu("cold")
    row("  same, session cache off (page cache warm), one process (s)", t["diffusers"]["cold_s"],
        t["fp32_no_cache"]["cold_s"], None, "{:.1f}", "")
    if "diffusers_malloc_keeps" in t:
        row("  against diffusers with glibc keeping freed memory (MALLOC_KEEPS_FREED), one process (s)",
            t["diffusers_malloc_keeps"]["cold_s"], t["fp32"]["cold_s"], get(t, "int8", "cold_s"), "{:.1f}", "")
    if "uncached_s" in t["fp32"]:
        uncached_runs = len(t["fp32"]["uncached_runs_s"])
        row(f"  same, weights read from disk (page cache dropped first) (s), median of {uncached_runs}",
            t["diffusers"]["uncached_s"], t["fp32"]["uncached_s"], get(t, "int8", "uncached_s"), "{:.1f}", "<= 0.5x")
        lines.append(f"|   ratio in each round | | | {spread(t, 'fp32', 'uncached_ratios')} | | "
                     f"{spread(t, 'int8', 'uncached_ratios')} | |")
        system_cpu("uncached")
    def startup(name: str) -> float | None:  # both from the first round's process, which made the warm images
        return t[name].get("cold_runs_s", [t[name]["cold_s"]])[0] - t[name]["warm_s"] if name in t else None

    row("  cold minus warm: imports, loading, first-run set-up (s)", startup("diffusers"), startup("fp32"),
        startup("int8"), "{:.1f}", "")
    row("  process start to pipeline loaded: interpreter, imports, loading (s)", t["diffusers"]["ready_s"],
        t["fp32"]["ready_s"], get(t, "int8", "ready_s"), "{:.2f}", "")
    row("text-to-image peak RSS (MB)", t["diffusers"]["peak_rss_mb"], t["fp32"]["peak_rss_mb"],
        get(t, "int8", "peak_rss_mb"), "{:.0f}", "<= 0.8x")
    if "peak_anon_mb" in t["diffusers"]:
        row("  of it anonymous (not file-backed; sampled every 20 ms) (MB)", t["diffusers"]["peak_anon_mb"],
            t["fp32"].get("peak_anon_mb"), get(t, "int8", "peak_anon_mb"), "{:.0f}", "")
    row("  low_memory (one component at a time) (MB)", t["diffusers"]["peak_rss_mb"],
        t["fp32_low_memory"]["peak_rss_mb"], get(t, "int8_low_memory", "peak_rss_mb"), "{:.0f}", "well below 0.8x")
    for capped in r.get("capped", []):
        lines.extend(capped_lines(capped))
    def share(name: str) -> str:
        o = t.get(name, {})
        if "overhead_share" not in o:  # JSON of earlier runs has none for diffusers
            return "-"
        return f"{o['overhead_s_per_step'] * 1000:.3g} ms = {100 * o['overhead_share']:.3g}% of a {o['step_s'] * 1000:.4g} ms step"

    ratio = (f"{t['fp32']['overhead_s_per_step'] / t['diffusers']['overhead_s_per_step']:.2f}x (per step)"
             if "overhead_s_per_step" in t["diffusers"] else "")
    loops = t["fp32"].get("overhead_loops")
    of_loops = {None: "", 1: ", one image's loop"}.get(loops, f", median of {loops} images' loops")
    lines.append(f"| scheduler + Python overhead per step{of_loops} | {share('diffusers')} | {share('fp32')} | {ratio} | "
                 f"{share('int8')} | | < 1% |")
    if "install" in r:
        i = r["install"]
        lines.append(f"| install size, fresh venv (MB) | {i['diffusers']['mb']:.0f} (torch {r['machine'].get('torch', '')}, "
                     f"diffusers, transformers) | {i['sdport']['mb']:.0f} (base install) | {i['ratio']:.2f}x | | | "
                     f"< 300 MB |")
    if "int8_image_error" in r:
        e = r["int8_image_error"]
        lines.append(f"| int8 image vs fp32 image ([0,1] pixels) | | | | max {e['max_abs']:.3f}, mean "
                     f"{e['mean_abs']:.4f}, PSNR {e['psnr_db']:.1f} dB | | printed |")
    lines.append(f"| first-ever load (builds the session cache) (s) | | {r['first_load']['fp32']['load_s']:.1f} | | "
                 f"{cell(get(r['first_load'], 'int8', 'load_s'), '{:.1f}')} | | once per model and CPU |")
    return "\n".join(lines)


def run_and_write(args, bench_fn, table_fn) -> dict:
    """Runs the benchmark, writes its JSON (replacing the partial one) and prints the table."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = bench_fn(args)
    result["table"] = table_fn(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(result["table"])
    return result


def _count(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def _shares(text: str) -> list[float]:
    """"0.25,0.5" -> [0.25, 0.5]: shares in (0, 1]."""
    shares = [float(part) for part in text.split(",") if part.strip()]
    if not all(0 < share <= 1 for share in shares):
        raise argparse.ArgumentTypeError(f"{text!r}: shares must lie in (0, 1]")
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--sizes", default="256,512", help="UNet step sizes in pixels, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="text-to-image steps (default: 5 sd15, 10 tiny)")
    parser.add_argument("--image-size", type=int, default=None, help="text-to-image size (default: 512 sd15, 64 tiny)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per UNet measurement (after a warm-up)")
    parser.add_argument("--step-rounds", type=_count, default=1,
                        help="UNet-step processes per side, started in turn (PyTorch, sdport fp32, int8, PyTorch, ...)")
    parser.add_argument("--warm-runs", type=_count, default=None,
                        help="warm images after the cold one; the table gives their median (default: 1 sd15, 25 tiny)")
    parser.add_argument("--cold-runs", type=_count, default=1,
                        help="cold text-to-image images per side, taken in turn; the table gives their median")
    parser.add_argument("--uncached-runs", type=_count, default=None,
                        help="more cold images per side, each started with its model's files out of the page cache")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/<model>.json)")
    parser.add_argument("--onnx", type=Path, default=None, help="an existing sdport fp32 export of the model")
    parser.add_argument("--int8", type=Path, default=None, help="an existing int8 folder (sdport quantize)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 folder")
    parser.add_argument("--skip-install", action="store_true", help="skip the install-size measurement")
    parser.add_argument("--lock", default="/tmp/sd15.lock", help="flock file taken per sd15 measurement")
    parser.add_argument("--memory-cap", type=_shares, default="0.25",
                        help="one more cold image per side (sdport also in low_memory mode), files read from disk, "
                             "under a memory cgroup capped at this share of diffusers' peak RSS (comma-separated: "
                             "one image per side under each); empty skips it")
    add_worker_arguments(parser)
    args = parser.parse_args()
    if run_worker(WORKERS, args):
        return
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.steps = args.steps or (5 if args.model == "sd15" else 10)
    args.image_size = args.image_size or (512 if args.model == "sd15" else 64)
    # A tiny image takes ~50 ms, and the overhead row's median over 7 loops still moved 16-38 us
    # between processes of the same code: 25.
    args.warm_runs = args.warm_runs or (1 if args.model == "sd15" else 25)
    args.out = args.out or REPO / "benchmarks" / "results" / f"{args.model}.json"
    result = run_and_write(args, bench, table)
    print("\nratios (sdport / reference): " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
