"""Which files an ONNX graph reads, and the check that they all stay inside its model folder.

A model folder is untrusted input: a graph's external-data `location` could name any file on the
machine (an absolute path, `../`, a symlink out). check_graph_files refuses those before
onnxruntime opens anything. The locations come from a minimal protobuf wire-format walk (onnx is
not a runtime dependency): only the messages that can hold a TensorProto are entered; tensor
payloads are skipped by length, never read.
"""

from __future__ import annotations

import functools
import mmap
import os
from pathlib import Path

from sdport.models.manifest import ManifestError, inside
from sdport.runtime import checksums

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


def weight_files(graph_file: Path) -> frozenset[str]:
    """Real paths of the external-data files `graph_file` reads."""
    return frozenset(os.path.realpath(Path(graph_file).parent / loc) for loc in external_data_locations(graph_file))
