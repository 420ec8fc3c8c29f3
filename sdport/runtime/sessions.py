"""onnxruntime sessions: which provider, which options, and which files a graph may read.

Options are set deliberately from what was measured on an SD 1.5-sized UNet and VAE
(see FIELD_NOTES "onnxruntime CPU levers"); each choice says why where it is made.
"""

from __future__ import annotations

import contextlib
import functools
import io
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import onnxruntime as ort

from sdport.cache import cache_root
from sdport.errors import SdportError, UsageError, first_line
from sdport.models.manifest import ManifestError, inside
from sdport.runtime import checksums
from sdport.runtime.device_runs import DeviceRuns
from sdport.runtime.prefetch import prefetch

ProviderName = Literal["auto", "cpu", "cuda", "dml"]

# Our short names -> onnxruntime's execution providers, in the order "auto" tries them.
PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
INSTALL_HINT = {
    # One onnxruntime build per environment: they share the import name (README, "On a GPU").
    "cuda": "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]' (NVIDIA GPU)",
    "dml": "pip uninstall -y onnxruntime && pip install onnxruntime-directml (Windows)",
    "cpu": "reinstall onnxruntime",
}
# onnxruntime's type strings -> numpy dtypes (session.get_inputs()[i].type).
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
Say = Callable[[str], None]


# --- weights' resident pages ------------------------------------------------------------------
# onnxruntime memory-maps a graph's external weights and reads them in place (from the
# pre-optimized cache the packed ones too, see preoptimized_options), so once touched they count
# in the process's resident memory until it ends: the text encoder's 0.3 GB stay resident through
# every UNet step. Those pages are clean copies of the file, so after a graph's last run for a
# while they are dropped from this process (madvise MADV_DONTNEED); they stay in the kernel's page
# cache and come back on the next run by a page fault, not a disk read (15 ms for the SD 1.5 text
# encoder's 324 MB on 2 cores).
_MADV_DONTNEED = 4  # Linux; the call is skipped elsewhere
# A graph whose weight files are smaller keeps its pages: each release walks smaps (~10 ms with an
# SD pipeline's sessions open, 2 cores), which was a third of a tiny model's 64 px image (85 ms
# against 50 ms without) to save a few MB.
RELEASE_MIN_BYTES = 32 << 20
_HEX_DIGITS = frozenset("0123456789abcdef")


def _file_mappings(paths: frozenset[str] | None = None) -> list[dict]:
    """This process's file mappings from /proc/self/smaps (only those of `paths`, if given):
    start, end, path and their kB fields.

    smaps has a dozen or more lines per mapping (13,000 lines for an SD pipeline's process); only
    the mappings asked for are parsed: 10 ms a walk instead of 17 on 2 cores, three walks a call."""
    mappings: list[dict] = []
    current: dict | None = None
    with open("/proc/self/smaps") as smaps:  # line by line: the whole text would be megabytes resident
        for line in smaps:
            if line[:1] in _HEX_DIGITS:  # a mapping's header: "start-end perms offset dev inode [path]"
                head = line.split(None, 5)
                path = head[5].strip() if len(head) > 5 else ""
                current = None
                if paths is None or path in paths:
                    start, end = head[0].split("-")
                    current = {"start": int(start, 16), "end": int(end, 16), "path": path}
                    mappings.append(current)
            elif current is not None and line.endswith(" kB\n"):  # "Rss:   12 kB"; field names are capitalised
                key, value = line.split(":", 1)
                current[key] = int(value.split()[0])
    return mappings


def release_mapped_pages(files: frozenset[str]) -> None:
    """Drops this process's resident pages of the memory-mapped `files` (real paths).

    Only mappings with no page written (no copy-on-write "Anonymous" pages) are touched, so
    nothing is lost: the next access reads the file's pages again. Nothing happens where
    /proc/self/smaps or madvise is missing (not Linux).
    """
    if not files or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mappings = _file_mappings(files)
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, ValueError, IndexError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for m in mappings:
        if m["path"] in files and m.get("Anonymous", 1) == 0 and m.get("Rss", 0) > 0:
            madvise(m["start"], m["end"] - m["start"], _MADV_DONTNEED)


def weight_files(graph_file: Path) -> frozenset[str]:
    """Real paths of the external-data files `graph_file` reads."""
    return frozenset(os.path.realpath(Path(graph_file).parent / loc) for loc in external_data_locations(graph_file))


def available_providers() -> list[str]:
    """Our short names of the providers this onnxruntime build has, in preference order."""
    have = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in have]


def resolve_provider(provider: str, say: Say | None = None) -> str:
    """"auto" | "cpu" | "cuda" | "dml" -> the short name of an installed provider.

    "auto" takes CUDA, then DirectML, then CPU; a named provider that is not installed is a
    UsageError listing what is.
    """
    have = available_providers()
    if provider == "auto":
        chosen = have[0] if have else "cpu"
        if say:
            say(f"provider: {chosen} ({PROVIDERS[chosen]}; available: {', '.join(have)})")
    elif provider not in PROVIDERS:
        raise UsageError(
            f"unknown provider {provider!r}; choose auto, {', '.join(PROVIDERS)} "
            f"(installed here: {', '.join(have) or 'none'})"
        )
    elif provider not in have:
        raise UsageError(
            f"provider {provider!r} ({PROVIDERS[provider]}) is not installed in this onnxruntime "
            f"(available: {', '.join(have) or 'none'}); {INSTALL_HINT[provider]}, or use --provider auto"
        )
    else:
        chosen = provider
    if chosen == "cuda":
        _preload_cuda_libraries()
    return chosen


def _preload_cuda_libraries() -> None:
    """Loads CUDA and cuDNN from pip's nvidia-* packages (`onnxruntime-gpu[cuda,cudnn]`), which the
    dynamic loader would not find by itself; libraries found on the default paths load as before."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu 1.21+
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()):  # it print()s each library it could not load
        try:
            preload()
        except Exception:  # noqa: BLE001 - a failure here shows up, clearly, at session creation
            pass


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


# --- external data: a graph must not read files outside its model folder ----------------------
# A minimal protobuf wire-format walk (onnx is not a runtime dependency): only the messages that
# can hold a TensorProto are entered; tensor payloads are skipped by length, never read.

_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


class _Truncated(Exception):
    pass


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Truncated
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """Yields (field number, start, end) of each length-delimited field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _Truncated
            yield number, pos, pos + length
            pos += length
        else:  # groups (3, 4) are not used by ONNX
            raise _Truncated
    if pos != end:
        raise _Truncated


def _tensor_locations(buf, start: int, end: int, out: list[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number == _TENSOR_EXTERNAL_DATA:
            entry = {n: bytes(buf[a:b]).decode("utf-8", "replace") for n, a, b in _fields(buf, s, e)}
            if entry.get(_ENTRY_KEY) == "location":
                out.append(entry.get(_ENTRY_VALUE, ""))


def _sparse_locations(buf, start: int, end: int, out: list[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor_locations(buf, s, e, out)


def _node_locations(buf, start: int, end: int, out: list[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number != _NODE_ATTRIBUTE:
            continue
        for field, a, b in _fields(buf, s, e):
            if field in (_ATTR_T, _ATTR_TENSORS):
                _tensor_locations(buf, a, b, out)
            elif field in (_ATTR_G, _ATTR_GRAPHS):
                _graph_locations(buf, a, b, out)
            elif field in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse_locations(buf, a, b, out)


def _graph_locations(buf, start: int, end: int, out: list[str]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER:
            _tensor_locations(buf, s, e, out)
        elif number == _GRAPH_SPARSE:
            _sparse_locations(buf, s, e, out)
        elif number == _GRAPH_NODE:
            _node_locations(buf, s, e, out)


def external_data_locations(path: Path) -> list[str]:
    """The `location` of every external-data tensor of an ONNX file, as written in it."""
    # Memoized per version of the file: loading a model asks for each graph's locations two or
    # three times (checks, cache key, weights' pages), 0.05 s of Python each on SD 1.5's graphs.
    return list(_external_data_locations(str(path), checksums.stat_identity(os.stat(path))))


@functools.lru_cache(maxsize=32)
def _external_data_locations(path: str, _version: str) -> tuple[str, ...]:
    out: list[str] = []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ManifestError(f"{path}: empty file; re-export the model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                for number, s, e in _fields(buf, 0, len(buf)):
                    if number == _MODEL_GRAPH:
                        _graph_locations(buf, s, e, out)
                    elif number == _MODEL_FUNCTIONS:
                        for field, a, b in _fields(buf, s, e):
                            if field == _FUNCTION_NODE:
                                _node_locations(buf, a, b, out)
            except _Truncated:
                raise ManifestError(f"{path}: not a readable ONNX file (truncated?); re-export the model") from None
            except RecursionError:  # subgraphs nested thousands deep: no real model does that
                raise ManifestError(f"{path}: graphs nested too deeply to check; refusing to load it") from None
    return tuple(sorted(set(out)))


def check_graph_files(folder: Path, file: str) -> Path:
    """The graph's path, after checking that it and its external data stay inside `folder`."""
    path = inside(folder, file)
    if not path.is_file():
        raise ManifestError(f"{folder}: graph file {file} not found; re-export the model")
    for location in external_data_locations(path):
        relative = (Path(file).parent / location).as_posix()
        try:
            data = inside(folder, relative)
        except ManifestError:
            raise ManifestError(
                f"{file}: its external data location {location!r} points outside the model folder "
                f"{Path(folder).resolve()}; refusing to load it (weights must live in the folder)"
            ) from None
        if not data.is_file():
            raise ManifestError(f"{file}: its external data file {location!r} is missing from {folder}")
    return path


# --- one graph -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Port:
    """One graph input or output as the session declares it."""

    name: str
    dtype: type  # numpy scalar type
    shape: tuple[int | str | None, ...]


def _ports(args) -> tuple[Port, ...]:
    ports = []
    for arg in args:
        dtype = ORT_DTYPES.get(arg.type)
        shape = tuple(arg.shape) if arg.shape is not None else ()
        ports.append(Port(arg.name, dtype, shape))
    return tuple(ports)


class Graph:
    """One ONNX graph in a session, run on numpy arrays.

    On CUDA each input shape runs on device buffers of its own (device_runs.DeviceRuns): inputs are
    copied into them in place, and inputs that stay fixed for many runs (the text embeddings, put
    there with `keep_on_device`) only when they change. (The schedulers are NumPy, so the latents
    cross to the host each step.) With `cuda_graph` the runs are captured as CUDA graphs; a graph
    that can't be captured opens without them, with a note on stderr. Without `prepack` the CPU's
    matrix products pack their weights at each run, not at session creation (session_options).
    """

    def __init__(
        self, name: str, path: Path, provider: str, fused: bool, cuda_graph: bool = False, prepack: bool = True,
    ) -> None:
        self.name = name
        self.path = path
        self.provider = provider
        self._device_runs: DeviceRuns | None = None
        if provider == "cuda" and cuda_graph:
            try:
                session, loaded = self._new_session(path, provider, fused, {"enable_cuda_graph": "1"})
                self._device_runs = DeviceRuns(name, session, captured=True)
            except Exception as exc:  # noqa: BLE001 - e.g. nodes left on the CPU: open it without
                print(f"{name}: no CUDA graphs for this graph ({first_line(exc)}); running without them",
                      file=sys.stderr)
        if self._device_runs is None:
            try:
                session, loaded = self._new_session(path, provider, fused, prepack=prepack)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
                raise SdportError(
                    f"{name}: onnxruntime could not load {path} ({first_line(exc)}); if it uses operators "
                    f"this onnxruntime lacks, re-export with --portable or upgrade onnxruntime"
                ) from exc
            if provider == "cuda":
                self._device_runs = DeviceRuns(name, session, captured=False)
        if provider == "cpu":
            # Opening a cache entry, onnxruntime packs each product's weights again only to find
            # the packed copy in the entry, and frees its own; glibc kept those pages: 0.29-0.32 GB
            # of an SD 1.5 fp32 UNet's, held to the end of the process (trimmed in 20 ms).
            _trim_heap()
        self.session = session
        self.inputs = _ports(self.session.get_inputs())
        self.outputs = _ports(self.session.get_outputs())
        # The mapped weight files whose pages a last run releases: only the CPU provider reads
        # weights in place from them; a GPU provider copies them to the device at session
        # creation, where the smaps walk would cost ~20 ms for nothing.
        self.weight_files = weight_files(loaded) if provider == "cpu" else frozenset()
        small = sum(map(os.path.getsize, self.weight_files)) < RELEASE_MIN_BYTES
        self._released_files = frozenset() if small else self.weight_files
        self._release_options = None
        # After a run with these options the arena hands its free memory back (to the OS, or to
        # the GPU): the UNet's activations (0.4 GB at 512 px on CPU) are otherwise held through
        # the VAE decode. On CPU only fused graphs run with an arena (session_options). Never
        # with CUDA graphs: their replays use the arena's memory at the addresses of the capture.
        arena = {"cpu": "cpu:0" if fused else None, "cuda": "gpu:0"}.get(provider)
        if arena and not self.cuda_graphs:
            self._release_options = ort.RunOptions()
            self._release_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arena)

    @staticmethod
    def _new_session(
        path: Path, provider: str, fused: bool, extra: dict[str, str] | None = None, prepack: bool = True,
    ) -> tuple[ort.InferenceSession, Path]:
        """open_session with sdport's provider list; `extra`: more CUDA provider options."""
        chosen = PROVIDERS[provider]
        if provider == "cuda":
            chosen = (chosen, {**cuda_provider_options(), **(extra or {})})
        providers = [chosen] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        printed = io.StringIO()  # onnxruntime print()s its provider fallbacks to stdout
        with contextlib.redirect_stdout(printed):
            opened = open_session(path, provider, fused, providers, prepack=prepack)
        if printed.getvalue().strip():  # a fallback that worked: worth knowing, but not on stdout
            print(" ".join(printed.getvalue().replace("*", "").split()), file=sys.stderr)
        return opened

    @property
    def cuda_graphs(self) -> bool:
        """Whether this graph runs as captured CUDA graphs (device_runs.py)."""
        return self._device_runs is not None and self._device_runs.captured

    def input(self, name: str) -> Port:
        return next(p for p in self.inputs if p.name == name)

    def keep_on_device(self, name: str, value: np.ndarray) -> None:
        """Keeps `value` for input `name` until `release_device`: copied to the GPU at the next run
        of each input shape, then no more (CUDA only; otherwise a no-op)."""
        if self._device_runs is not None:
            self._device_runs.keep(name, np.array(value, dtype=self.input(name).dtype, order="C"))

    def release_device(self) -> None:
        if self._device_runs is not None:
            self._device_runs.release()

    def run(self, feeds: dict[str, np.ndarray], last: bool = False) -> dict[str, np.ndarray]:
        """Runs the graph: inputs cast to the declared dtypes, outputs by name (fp16 ones as float32).

        `last`: the last run for a while (the text encoder's, the final UNet step's, the last
        image's decode): the session's arena hands its working memory back after it, to the OS or
        the GPU (measured no slower on the next run), and on CPU its weights' pages leave this
        process's resident set (release_mapped_pages).
        """
        kept = self._device_runs.kept if self._device_runs is not None else {}
        cast = {}
        for port in self.inputs:
            if port.name in kept:
                continue
            value = np.asarray(feeds[port.name], dtype=port.dtype)
            # Not np.ascontiguousarray: it turns a 0-d array (a scalar timestep) into shape (1,).
            cast[port.name] = value if value.flags.c_contiguous else value.copy()
        options = self._release_options if last else None
        if self._device_runs is not None:
            results = self._device_runs.run(cast, options)
        else:
            results = self.session.run(None, cast, options)
        if last:
            release_mapped_pages(self._released_files)
        return {
            port.name: np.asarray(r, dtype=np.float32) if r.dtype == np.float16 else r
            for port, r in zip(self.outputs, results)
        }


# --- pre-optimized graphs: optimized once, cached, then loaded as they are ----------------------
# Graph optimization runs at every session creation (1.3 s for an SD 1.5 UNet at EXTENDED, 7-13 s
# at ALL). Done once and saved with `optimized_model_filepath`, with the matrix-product kernels'
# packed weights beside the others, the saved graph loads with optimizations off and every weight
# memory-mapped (shared, and nothing to pack; preoptimized_options). EXTENDED, not ALL, is saved:
# ALL's NCHWc layouts ran the int8 UNet 2x slower and the fp32 one no faster (bench_sd.py, 2
# cores, 2026-11-25). A saved graph is tied to the CPU type and the onnxruntime version, so both
# are in the cache key.
# On CUDA the same holds at the provider's own EXTENDED level: an SD 1.5 fp16 UNet's session took
# 2.6 s to make, 0.8 s from the saved graph, with the same output and step time (H100, 2026-11-26).
# There the key names the provider and the GPU instead of the CPU.

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
    import hashlib

    digest = hashlib.sha256(_file_identity(Path(path)).encode())
    for location in external_data_locations(Path(path)):
        digest.update(f"{location}|{_file_identity(Path(path).parent / location)}".encode())
    level = session_options(provider, fused).graph_optimization_level
    hardware = _cpu_identity() if provider == "cpu" else f"{provider}|{_gpu_identity()}"
    # v4: CPU entries hold the packed weights (preoptimized_options), unless made without them
    unpacked = "|unpacked" if provider == "cpu" and not prepack else ""
    digest.update(f"{ort.__version__}|{hardware}|fused={fused}|level={level}|v4{unpacked}".encode())
    return digest.hexdigest()[:32]


def _trim_heap() -> None:
    """Hands the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Optimizing a graph parses it whole, weights included, and glibc keeps what was freed: writing
    SD 1.5's text encoder entry left 0.65 GB resident in the process until it ended.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _preoptimize(
    path: Path, entry: Path, provider: str, fused: bool, providers: list, prepack: bool = True,
) -> None:
    """Writes the optimized graph of `path` for `provider` to `entry`/model.onnx, atomically (temp
    + rename); on CPU with the packed weights unless not `prepack`."""
    import json
    import shutil

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
        _trim_heap()
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
    import json

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
    # 4 (2026-11-28). Saved in the entry (_preoptimize), they load mapped like the other weights,
    # at ~1 s more session creation and +0.3 GB resident for that UNet. CUDA's entries hold no
    # packed CPU weights: there it stays off.
    if provider != "cpu":
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def _read_ahead_weights(graph_file: Path, provider: str) -> None:
    """Starts reading the weight files a CPU session of `graph_file` maps into the page cache
    (prefetch.py), to be read as the session opens; a GPU session copies them to the device."""
    if provider == "cpu":
        prefetch(sorted(weight_files(graph_file)))


def open_session(
    path: Path, provider: str, fused: bool, providers: list[str],
    profile_prefix: str | None = None, prepack: bool = True,
) -> tuple[ort.InferenceSession, Path]:
    """An onnxruntime session for `path`, and the graph file it loaded: on CPU and CUDA the
    pre-optimized cache's copy when possible, else `path`.

    Any failure of the cache (not writable, disk full, an onnxruntime that can't save) falls back
    to optimizing at session creation, as without the cache. `prepack`: see session_options.
    `profile_prefix` turns on onnxruntime's profiler (benchmarks/profile_unet.py), its JSON
    written at `end_profiling()`.
    """

    def profiled(options: ort.SessionOptions) -> ort.SessionOptions:
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return options

    cache = ort_cache_dir() if provider in CACHED_PROVIDERS else None
    if cache is not None:
        try:
            entry = cache / graph_cache_key(path, fused, provider, prepack)
            if not (entry / "model.onnx").is_file():
                _preoptimize(path, entry, provider, fused, providers, prepack)
            _read_ahead_weights(entry / "model.onnx", provider)
            session = ort.InferenceSession(
                str(entry / "model.onnx"), sess_options=profiled(preoptimized_options(fused, provider, prepack)),
                providers=providers,
            )
            return session, entry / "model.onnx"
        except Exception:  # noqa: BLE001 - the cache is an optimization; the plain path reports errors
            pass
    _read_ahead_weights(Path(path), provider)
    session = ort.InferenceSession(
        str(path), sess_options=profiled(session_options(provider, fused, prepack)), providers=providers
    )
    return session, Path(path)
