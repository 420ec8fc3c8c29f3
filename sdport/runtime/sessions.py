"""onnxruntime sessions: which provider, and one graph in a session, run on NumPy arrays.

The parts a session is made of live beside it: its options (options.py), the files a graph may
read (graph_files.py), the pre-optimized cache it opens from (graph_cache.py) and the memory it
hands back after its last run (resident.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
import onnxruntime as ort

from sdport.errors import SdportError, UsageError, first_line
from sdport.runtime.device_runs import DeviceRuns
from sdport.runtime.graph_cache import (
    CACHED_PROVIDERS, graph_cache_key, ort_cache_dir, preoptimize, preoptimized_options,
)
from sdport.runtime.graph_files import weight_files, weight_ranges
from sdport.runtime.options import cuda_provider_options, session_options
from sdport.runtime.prefetch import prefetch
from sdport.runtime.resident import release_mapped_pages, trim_heap

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


# sys.stdout is one for the process: redirects that overlap in two threads restore each other's
# redirect, and the process's output goes to a StringIO for good (two Pipeline.loads in threads
# did). sdport's redirects take turns; another thread's prints during one still land in it.
_STDOUT_REDIRECT = threading.Lock()


@contextlib.contextmanager
def _stdout_to(buffer: io.StringIO) -> Iterator[None]:
    with _STDOUT_REDIRECT, contextlib.redirect_stdout(buffer):
        yield


def _preload_cuda_libraries() -> None:
    """Loads CUDA and cuDNN from pip's nvidia-* packages (`onnxruntime-gpu[cuda,cudnn]`), which the
    dynamic loader would not find by itself; libraries found on the default paths load as before."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu 1.21+
    if preload is None:
        return
    with _stdout_to(io.StringIO()):  # it print()s each library it could not load
        try:
            preload()
        except Exception:  # noqa: BLE001 - a failure here shows up, clearly, at session creation
            pass


# --- one graph -----------------------------------------------------------------------------

# A graph whose weight files total less keeps their pages after its last run: each release walks
# smaps (resident.release_mapped_pages; ~10 ms with an SD pipeline's sessions open, 2 cores), which
# was a third of a tiny model's 64 px image (85 ms against 50 ms without) to save a few MB.
RELEASE_MIN_BYTES = 32 << 20


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
            trim_heap()
        self.session = session
        self.inputs = _ports(self.session.get_inputs())
        self.outputs = _ports(self.session.get_outputs())
        # Named once, not at each run: a tiny UNet's run is a millisecond and this loop runs per step.
        self._output_names = [port.name for port in self.outputs]
        self._fp16_outputs = any(port.dtype == np.float16 for port in self.outputs)
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
        with _stdout_to(printed):
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
        kept = self._device_runs.kept if self._device_runs is not None else ()
        cast = self._cast(feeds, [port for port in self.inputs if port.name not in kept])
        options = self._release_options if last else None
        if self._device_runs is not None:
            results = self._device_runs.run(cast, options)
        else:
            results = self.session.run(self._output_names, cast, options)
        if last:
            release_mapped_pages(self._released_files)
        if not self._fp16_outputs:
            return dict(zip(self._output_names, results))
        return {
            name: np.asarray(r, dtype=np.float32) if r.dtype == np.float16 else r
            for name, r in zip(self._output_names, results)
        }

    def repeated(self, output: str, fixed: dict[str, np.ndarray],
                 each: list[dict[str, np.ndarray]]) -> Callable[[int], np.ndarray]:
        """`run(k)`: the graph's `output`, as Graph.run gives it, for the inputs `fixed` and `each[k]`,
        for a loop that runs the graph len(each) times: the last of them is a Graph.run(last=True).
        The arrays in `fixed` may change in place between runs.

        On CPU, where every fixed input is already of its declared dtype and C-contiguous (so
        onnxruntime reads the array itself, not a copy) and no output is fp16, the inputs are cast
        once and each run is one onnxruntime call: a tiny UNet runs in a millisecond or two, and
        Graph.run's casts, input list and output dict were 3.5-4 us of the 20-25 us its step took
        outside onnxruntime. Elsewhere each run is a Graph.run.
        """
        last = len(each) - 1
        fixed_cast = self._cast(fixed, [port for port in self.inputs if port.name in fixed])
        if (self._device_runs is not None or self._fp16_outputs
                or any(fixed_cast[name] is not value for name, value in fixed.items())):
            return lambda k: self.run({**fixed, **each[k]}, k == last)[output]
        varying = [port for port in self.inputs if port.name not in fixed]
        feeds = [{**fixed_cast, **self._cast(one, varying)} for one in each]
        names, session_run, release_options = [output], self.session.run, self._release_options

        def run(k: int) -> np.ndarray:
            if k != last:
                return session_run(names, feeds[k])[0]
            result = session_run(names, feeds[k], release_options)[0]
            release_mapped_pages(self._released_files)
            return result

        return run

    @staticmethod
    def _cast(feeds: dict[str, np.ndarray], ports: Iterable[Port]) -> dict[str, np.ndarray]:
        """The feeds of `ports` in the dtypes they declare, C-contiguous."""
        cast = {}
        for port in ports:
            value = np.asarray(feeds[port.name], dtype=port.dtype)
            # Not np.ascontiguousarray: it turns a 0-d array (a scalar timestep) into shape (1,).
            cast[port.name] = value if value.flags.c_contiguous else value.copy()
        return cast


def _read_ahead_weights(graph_file: Path, provider: str) -> None:
    """Starts reading what a CPU session of `graph_file` reads of its weight files into the page
    cache (prefetch.py), to be read as the session opens; a GPU session copies them to the device."""
    if provider == "cpu":
        prefetch(weight_ranges(graph_file))


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
                preoptimize(path, entry, provider, fused, providers, prepack)
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
