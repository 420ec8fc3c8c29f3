"""Which files an ONNX graph reads, and the check that they all stay inside its model folder.

A model folder is untrusted input: a graph's external-data `location` could name any file on the
machine (an absolute path, `../`, a symlink out). check_graph_files refuses those before
onnxruntime opens anything. The locations come from a minimal protobuf wire-format walk (onnx is
not a runtime dependency): only the messages that can hold a TensorProto are entered; tensor
payloads are skipped by length, never read: the walk maps a large file for random access, so
that starting from disk it reads the pages of the tensors' headers, not a readahead window around each
(SD 1.5's inline-weight text encoder and VAEs, 0.83 GB, were 0.63 GB read from disk at each load
and 0.35-0.85 s of a 3.7-3.9 s load from disk, only to find that they have no external data;
their cache entries are what the sessions open).

The same walk gives the byte ranges of its weight files a CPU session reads (weight_ranges), so
that those alone are read ahead (prefetch.py).
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


def _tensor_external_data(buf, start: int, end: int, out: list[dict[str, str]]) -> None:
    entries = {}
    for number, s, e in _fields(buf, start, end):
        if number == _TENSOR_EXTERNAL_DATA:
            entry = {n: bytes(buf[a:b]).decode("utf-8", "replace") for n, a, b in _fields(buf, s, e)}
            entries[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")
    if "location" in entries:
        out.append(entries)


def _sparse_external_data(buf, start: int, end: int, out: list[dict[str, str]]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor_external_data(buf, s, e, out)


def _node_external_data(buf, start: int, end: int, out: list[dict[str, str]]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number != _NODE_ATTRIBUTE:
            continue
        for field, a, b in _fields(buf, s, e):
            if field in (_ATTR_T, _ATTR_TENSORS):
                _tensor_external_data(buf, a, b, out)
            elif field in (_ATTR_G, _ATTR_GRAPHS):
                _graph_external_data(buf, a, b, out)
            elif field in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse_external_data(buf, a, b, out)


def _graph_external_data(buf, start: int, end: int, out: list[dict[str, str]]) -> None:
    for number, s, e in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER:
            _tensor_external_data(buf, s, e, out)
        elif number == _GRAPH_SPARSE:
            _sparse_external_data(buf, s, e, out)
        elif number == _GRAPH_NODE:
            _node_external_data(buf, s, e, out)


def external_data(path: Path) -> list[dict[str, str]]:
    """The external-data entries (location, offset, length, ...) of each tensor of an ONNX file
    that has them, as written in it."""
    # Memoized per version of the file: loading a model asks for each graph's entries three or
    # four times (checks, cache key, read-ahead, weights' pages), 0.05 s of Python each on SD 1.5's graphs.
    return [dict(entries) for entries in _external_data(str(path), checksums.stat_identity(os.stat(path)))]


def external_data_locations(path: Path) -> list[str]:
    """The `location` of every external-data tensor of an ONNX file, as written in it."""
    return sorted({entries["location"] for entries in external_data(path)})


# A graph file this small is nearly all headers (its weights kept outside it): read whole by
# readahead windows, not by ~500 one-page reads in turn (SD 1.5's UNet graph, 2 MB), which cost
# as much as 0.3 s on an SSD, seconds on a disk that seeks.
_RANDOM_MIN_BYTES = 16 << 20


@functools.lru_cache(maxsize=32)
def _external_data(path: str, _version: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    out: list[dict[str, str]] = []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ManifestError(f"{path}: empty file; re-export the model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if len(buf) > _RANDOM_MIN_BYTES and hasattr(mmap, "MADV_RANDOM"):  # Linux, macOS
                buf.madvise(mmap.MADV_RANDOM)
            try:
                for number, s, e in _fields(buf, 0, len(buf)):
                    if number == _MODEL_GRAPH:
                        _graph_external_data(buf, s, e, out)
                    elif number == _MODEL_FUNCTIONS:
                        for field, a, b in _fields(buf, s, e):
                            if field == _FUNCTION_NODE:
                                _node_external_data(buf, a, b, out)
            except _Truncated:
                raise ManifestError(f"{path}: not a readable ONNX file (truncated?); re-export the model") from None
            except RecursionError:  # subgraphs nested thousands deep: no real model does that
                raise ManifestError(f"{path}: graphs nested too deeply to check; refusing to load it") from None
    return tuple(tuple(entries.items()) for entries in out)


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


# Ranges closer than this are read as one: the page between them would be read anyway.
_JOIN_GAP = 4096


def weight_ranges(graph_file: Path) -> list[tuple[str, list[tuple[int, int]]]]:
    """What a CPU session of `graph_file` reads of its external weights, in the order it reads
    them: (real path of a weight file, its (offset, length) ranges), sorted and joined.

    First the ranges that opening the session reads: for each weight a product's kernel packs, its
    original and, in a pre-optimized cache entry, the packed copy saved beside it (onnxruntime packs
    the original again only to find that copy, then frees its own and maps the copy). Then the
    other weights, read by the first run. Read ahead in file order instead, where the two kinds lie
    interleaved, opening SD 1.5's UNet from disk waited for most of its entry's 4.5 GB instead of
    2.2 GB: a one-step 512 px image from disk took 12.3-12.9 s against 11.9-12.2 s (2 cores,
    2026-11-29, runs in turn). With the walk's random access (above) as well: 11.4-12.2 s against
    13.0-14.0 s, 5.2 GB read from disk instead of 5.9.
    """
    opening: dict[str, list[tuple[int, int]]] = {}
    running: dict[str, list[tuple[int, int]]] = {}
    for entries in external_data(graph_file):
        path = os.path.realpath(Path(graph_file).parent / entries["location"])
        own = _own_range(path, entries)
        packed = _packed_ranges(entries)
        if own is None or packed is None:  # malformed numbers: onnxruntime will say so; read all of it
            running.setdefault(path, []).append((0, _size(path)))
        elif packed:
            opening.setdefault(path, []).extend([own, *packed])
        else:
            running.setdefault(path, []).append(own)
    return [(path, _joined(ranges)) for group in (opening, running) for path, ranges in sorted(group.items())]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # missing: check_graph_files reports it; nothing to read
        return 0


def _own_range(path: str, entries: dict[str, str]) -> tuple[int, int] | None:
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries.get("length", "0")) or _size(path) - offset  # 0 or none: to the file's end
    except ValueError:
        return None
    return offset, length


def _packed_ranges(entries: dict[str, str]) -> list[tuple[int, int]] | None:
    """The packed copies' ranges of a `prepacked_<n>` entry: "<kernel key>|<offset>;<length>;<checksum>|..."."""
    ranges = []
    for key, value in entries.items():
        if key.startswith("prepacked_"):
            try:
                for buffer in value.split("|")[1:]:
                    offset, length, _checksum = buffer.split(";")
                    ranges.append((int(offset), int(length)))
            except ValueError:
                return None
    return ranges


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    joined: list[tuple[int, int]] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if joined and offset <= joined[-1][0] + joined[-1][1] + _JOIN_GAP:
            start, end = joined[-1][0], max(joined[-1][0] + joined[-1][1], offset + length)
            joined[-1] = (start, end - start)
        else:
            joined.append((offset, length))
    return joined

