"""How each onnxruntime session is set up: threads, optimization level, arena, CUDA's options.

Options are set deliberately from what was measured on an SD 1.5-sized UNet and VAE
(see FIELD_NOTES "onnxruntime CPU levers"); each choice says why where it is made.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's FPU)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def session_options(provider: str, fused: bool, prepack: bool = True) -> ort.SessionOptions:
    """Options for one graph; `fused` says whether attention was fused at export ("ort" level);
    without `prepack` the CPU's matrix products pack their weights at each run, not at creation."""
    options = ort.SessionOptions()
    # One thread per physical core: a second hyper-thread per core adds contention, not FLOPs,
    # and onnxruntime's own default ignores the CPU affinity a container gives us.
    options.intra_op_num_threads = physical_cores()
    options.inter_op_num_threads = 1
    # Each session has its own pool, whose workers otherwise spin ~30 ms after every run: the text
    # encoder's then competes with the UNet's threads for the same cores, and the UNet's with the
    # VAE's. Stopped at the end of a run, a tiny model's 64 px image took 21 ms instead of 43-69
    # (2 cores); SD 1.5-sized steps are unchanged.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # SD graphs are one long chain
    # EXTENDED, not ALL: ALL adds the CPU layout transforms, which cost 7-13 s per session on an
    # SD 1.5 UNet and copy every conv weight into private memory; measured no faster per step.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # The CPU arena helps a fused graph but grows by ~2 GB on an unfused one (1 GiB attention
    # score matrices are cached between runs): on only where attention was fused at export.
    options.enable_cpu_mem_arena = fused
    # Memory patterns (one planned block per run) only pay without the arena, where each tensor
    # would otherwise be fresh memory. With the arena, the planned block comes on top of the
    # blocks the first run left in it: off, at the same speed, the SD 1.5 UNet's peak at 512 px
    # is 3717 MB instead of 4038, and the VAE decoder's first run in a process takes 13.5 s
    # instead of 18.3 (without an arena it page-faults every 134 MB activation in) at 1319 MB.
    # DirectML requires them off (and sequential execution).
    options.enable_mem_pattern = provider != "dml" and not (provider == "cpu" and fused)
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own fallbacks
    if provider == "cpu" and not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def cuda_provider_options() -> dict[str, str]:
    """onnxruntime CUDA provider options for every graph (measured with benchmarks/bench_gpu.py).

    Each session has an arena of its own, which by default grows to the next power of two and
    keeps its peak, so the text encoder's, the UNet's and the VAE decoder's working memory were
    all held at once: 7.0 GB against diffusers' 4.0 GB for an SD 1.5 text-to-image at 512 px.
    Grown by what is asked, an arena hands all of it back after a graph's last run of a call
    (Graph.run(last=True)): 5.1 GB, at the same speed (H100, 2026-11-26). cuDNN's workspace limit
    (cudnn_conv_use_max_workspace=0) and one arena shared by all sessions changed neither.
    """
    # TF32 stays on (onnxruntime's default, and PyTorch's for convolutions): it runs the fp32 VAE of
    # an --fp16 export on tensor cores, at fp32's range, where fp16 can overflow. It moves pixels
    # by up to 7e-3 from the CPU's (tiny model, 4 steps, H100); with use_tf32=0, by 3.5e-6.
    return {"arena_extend_strategy": "kSameAsRequested"}
