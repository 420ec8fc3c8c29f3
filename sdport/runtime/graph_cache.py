"""Pre-optimized graphs: optimized once, cached, then loaded as they are.

Graph optimization runs at every session creation (1.3 s for an SD 1.5 UNet at EXTENDED, 7-13 s
at ALL). Done once and saved with `optimized_model_filepath`, with the matrix-product kernels'
packed weights beside the others, the saved graph loads with optimizations off and every weight
memory-mapped (shared, and nothing to pack; preoptimized_options). EXTENDED, not ALL, is saved:
ALL's NCHWc layouts ran the int8 UNet 2x slower and the fp32 one no faster (bench_sd.py, 2
cores, 2026-11-25). A saved graph is tied to the CPU type and the onnxruntime version, so both
are in the cache key.
On CUDA the same holds at the provider's own EXTENDED level: an SD 1.5 fp16 UNet's session took
2.6 s to make, 0.8 s from the saved graph, with the same output and step time (H100, 2026-11-26).
There the key names the provider and the GPU instead of the CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import onnxruntime as ort

from sdport.cache import cache_root
from sdport.runtime import checksums
from sdport.runtime.graph_files import external_data_locations
from sdport.runtime.options import session_options
from sdport.runtime.resident import trim_heap

ORT_CACHE_ENV = "SDPORT_ORT_CACHE"  # "0"/"off": never use the cache; a path: the cache folder


def ort_cache_dir() -> Path | None:
    """Where pre-optimized graphs are kept, or None when the cache is turned off."""
    value = os.environ.get(ORT_CACHE_ENV, "")
    if value.lower() in ("0", "off", "false", "no"):
        return None
    if value and value.lower() not in ("1", "on", "true", "yes"):
        return Path(value)
    return cache_root() / "ort"


def cpu_info() -> dict[str, str] | None:
    """/proc/cpuinfo's fields ("model name", "flags", "cpu family", ...) as the first entry that
    has each gives them; None where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_identity() -> str:
    """CPU model and vector-extension flags: what a saved NCHWc graph depends on."""
    fields = cpu_info()
    if fields is None:
        import platform

        return f"{platform.machine()} {platform.processor()}"
    return f"{fields.get('model name', '')}|{fields.get('flags', '')}"


def _file_identity(path: Path) -> str:
    """A file as the cache key sees it: a small one by its bytes, a large one (weights) by size,
    mtime, ctime and inode, as the sha256 check's cache does (checksums.py); hashing SD 1.5's
    inline-weight text encoder and VAEs (0.8 GB) cost 1.0 s per load."""
    stat = path.stat()
    if stat.st_size < checksums.CACHE_MIN_BYTES:
        return checksums.file_sha256(path)
    return checksums.stat_identity(stat)


def _gpu_identity() -> str:
    """The NVIDIA GPUs' models as the driver lists them (Linux), else nothing."""
    models = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        with contextlib.suppress(OSError):
            models += [l.split(":", 1)[1].strip() for l in info.read_text().splitlines() if l.startswith("Model:")]
    return ",".join(models)


CACHED_PROVIDERS = ("cpu", "cuda")  # DirectML's sessions are left as they are


def graph_cache_key(path: Path, fused: bool, provider: str = "cpu", prepack: bool = True) -> str:
    """sha256 over the graph file's and its data files' identities, onnxruntime, the provider and
    its hardware (the CPU, or the GPU for CUDA), and on CPU whether the entry holds packed weights."""
    digest = hashlib.sha256(_file_identity(Path(path)).encode())
    for location in external_data_locations(Path(path)):
        digest.update(f"{location}|{_file_identity(Path(path).parent / location)}".encode())
    level = session_options(provider, fused).graph_optimization_level
    hardware = _cpu_identity() if provider == "cpu" else f"{provider}|{_gpu_identity()}"
    # v4: CPU entries hold the packed weights (preoptimized_options), unless made without them
    unpacked = "|unpacked" if provider == "cpu" and not prepack else ""
    digest.update(f"{ort.__version__}|{hardware}|fused={fused}|level={level}|v4{unpacked}".encode())
    return digest.hexdigest()[:32]


def preoptimize(
    path: Path, entry: Path, provider: str, fused: bool, providers: list, prepack: bool = True,
) -> None:
    """Writes the optimized graph of `path` for `provider` to `entry`/model.onnx, atomically (temp
    + rename); on CPU with the packed weights unless not `prepack`."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        options = session_options(provider, fused, prepack)  # its optimization level is what gets saved
        options.optimized_model_filepath = str(tmp / "model.onnx")
        # Weights go to one data file beside it (an SD 1.5 UNet is over protobuf's 2 GB limit).
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx_data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if provider == "cpu" and prepack:  # the CPU kernels' packed weights too (preoptimized_options)
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        del session
        trim_heap()
        made_from = {"source": str(Path(path).resolve()), "provider": provider}
        (tmp / "source.json").write_text(json.dumps(made_from) + "\n")
        # Entries made from this same source file for this provider are stale now (the file was
        # exported again or changed), and so are those whose source file is gone (a deleted
        # folder): drop them, as each is a full copy of its weights (3.4 GB for an SD 1.5 UNet).
        # The other provider's entry stays: one machine may run both.
        for old in entry.parent.iterdir():
            if old.name.startswith(".") or old == entry:
                continue
            old_from = cache_entry_source(old)
            if old_from is not None and (old_from == made_from or not Path(old_from["source"]).exists()):
                shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(entry)
        except OSError:  # another process finished the same entry first
            if not (entry / "model.onnx").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_entry_source(entry: Path) -> dict[str, str] | None:
    """What a pre-optimized cache entry was made from, {"source": graph path, "provider": name};
    None for a folder that is not a whole entry of ours."""
    try:
        made_from = {"provider": "cpu", **json.loads((entry / "source.json").read_text())}  # older ones: CPU
    except (OSError, ValueError, TypeError):  # not an entry of ours, or written half
        return None
    return made_from if isinstance(made_from.get("source"), str) else None


def preoptimized_options(fused: bool, provider: str = "cpu", prepack: bool = True) -> ort.SessionOptions:
    """Options for loading a cached pre-optimized graph: nothing left to optimize; on CPU the
    weights packed for the matrix-product kernels are mapped from the entry as saved (with
    `prepack`; without it the products pack them at each run)."""
    options = session_options(provider, fused, prepack)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Packed at session creation, the weights would be private copies (3 s and ~+1 GB for an SD
    # 1.5 UNet); unpacked, each product packs its weights at every run: SD 1.5's 512 px step took
    # 7.0 s instead of 6.0-6.9 s (fp32) and 5.6-5.8 s instead of 4.3-4.4 s (int8) on a 2-core Zen
    # 4 (2026-11-28). Saved in the entry (preoptimize), they load mapped like the other weights,
    # at ~1 s more session creation and +0.3 GB resident for that UNet. CUDA's entries hold no
    # packed CPU weights: there it stays off.
    if provider != "cpu":
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options
