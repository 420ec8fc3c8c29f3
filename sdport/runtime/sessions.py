"""onnxruntime sessions: which provider, which options, and which files a graph may read.

Options are set deliberately from what was measured on an SD 1.5-sized UNet and VAE
(see FIELD_NOTES "onnxruntime CPU levers"); each choice says why where it is made.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import onnxruntime as ort

from sdport.errors import SdportError, UsageError
from sdport.models.manifest import ManifestError, inside

ProviderName = Literal["auto", "cpu", "cuda", "dml"]

# Our short names -> onnxruntime's execution providers, in the order "auto" tries them.
PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
INSTALL_HINT = {
    "cuda": "pip install 'sdport[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU and CUDA",
    "dml": "pip install 'sdport[directml]' (onnxruntime-directml, Windows only)",
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
        return chosen
    if provider not in PROVIDERS:
        raise UsageError(
            f"unknown provider {provider!r}; choose auto, {', '.join(PROVIDERS)} "
            f"(installed here: {', '.join(have) or 'none'})"
        )
    if provider not in have:
        raise UsageError(
            f"provider {provider!r} ({PROVIDERS[provider]}) is not installed in this onnxruntime "
            f"(available: {', '.join(have) or 'none'}); {INSTALL_HINT[provider]}, or use --provider auto"
        )
    return provider


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


def session_options(provider: str, fused: bool) -> ort.SessionOptions:
    """Options for one graph; `fused` says whether attention was fused at export ("ort" level)."""
    options = ort.SessionOptions()
    # One thread per physical core: a second hyper-thread per core adds contention, not FLOPs,
    # and onnxruntime's own default ignores the CPU affinity a container gives us.
    options.intra_op_num_threads = physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # SD graphs are one long chain
    # EXTENDED, not ALL: ALL adds the CPU layout transforms, which cost 7-13 s per session on an
    # SD 1.5 UNet and copy every conv weight into private memory; measured no faster per step.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # The CPU arena helps a fused graph but grows by ~2 GB on an unfused one (1 GiB attention
    # score matrices are cached between runs): on only where attention was fused at export.
    options.enable_cpu_mem_arena = fused
    # Memory patterns stay on (off saved 0.1 GB and cost 35-75% time), except that DirectML
    # requires them off and sequential execution.
    options.enable_mem_pattern = provider != "dml"
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own fallbacks
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
    return sorted(set(out))


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

    On CUDA, inputs that stay fixed for many runs (the text embeddings) can be put on the device
    once with `keep_on_device` and are then bound there with onnxruntime's I/O binding; the rest
    is copied in per run. (The schedulers are NumPy, so the latents cross to the host each step.)
    """

    def __init__(self, name: str, path: Path, provider: str, fused: bool) -> None:
        self.name = name
        self.path = path
        self.provider = provider
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=session_options(provider, fused), providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SdportError(
                f"{name}: onnxruntime could not load {path} ({reason}); if it uses operators this "
                f"onnxruntime lacks, re-export with --portable or upgrade onnxruntime"
            ) from exc
        self.inputs = _ports(self.session.get_inputs())
        self.outputs = _ports(self.session.get_outputs())
        self._device: dict[str, ort.OrtValue] = {}

    def input(self, name: str) -> Port:
        return next(p for p in self.inputs if p.name == name)

    def keep_on_device(self, name: str, value: np.ndarray) -> None:
        """Copies `value` to the GPU once for input `name` (CUDA only; otherwise a no-op)."""
        if self.provider == "cuda":
            array = np.array(value, dtype=self.input(name).dtype, order="C")
            self._device[name] = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def release_device(self) -> None:
        self._device.clear()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the graph: inputs cast to the declared dtypes, outputs by name (fp16 ones as float32)."""
        cast = {}
        for port in self.inputs:
            if port.name in self._device:
                continue
            value = np.asarray(feeds[port.name], dtype=port.dtype)
            # Not np.ascontiguousarray: it turns a 0-d array (a scalar timestep) into shape (1,).
            cast[port.name] = value if value.flags.c_contiguous else value.copy()
        if self._device:
            binding = self.session.io_binding()
            for name, value in cast.items():
                binding.bind_cpu_input(name, value)
            for name, value in self._device.items():
                binding.bind_ortvalue_input(name, value)
            for port in self.outputs:
                binding.bind_output(port.name, "cpu")
            self.session.run_with_iobinding(binding)
            results = binding.copy_outputs_to_cpu()
        else:
            results = self.session.run(None, cast)
        return {
            port.name: np.asarray(r, dtype=np.float32) if r.dtype == np.float16 else r
            for port, r in zip(self.outputs, results)
        }
