"""Weight files read ahead into the page cache before a graph's first run (runtime/prefetch.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sdport.runtime import Pipeline, prefetch, sessions
from sdport.runtime.graph_files import external_data_locations, weight_files, weight_ranges

WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)


def _fadvise_calls(monkeypatch) -> list[tuple[int, int, int]]:
    asked = []
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", WILLNEED, raising=False)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: asked.append((offset, length, advice)),
                        raising=False)
    return asked


def test_read_ahead_asks_for_every_byte_in_pieces_the_kernel_reads_whole(tmp_path, monkeypatch):
    # Linux reads at most its readahead limit per call (128 KB or more): a larger piece would be
    # read only in part, and a gap would leave its pages to the run's page faults.
    asked = _fadvise_calls(monkeypatch)
    file = tmp_path / "model.onnx_data"
    file.write_bytes(bytes(3 * prefetch.PIECE_BYTES + 5))
    prefetch.read_ahead(str(file), [(0, file.stat().st_size)])
    assert {advice for _, _, advice in asked} == {WILLNEED}
    assert all(length <= 128 << 10 for _, length, _ in asked)
    assert [offset for offset, _, _ in asked] == [sum(n for _, n, _ in asked[:i]) for i in range(len(asked))]
    assert asked[-1][0] + asked[-1][1] == file.stat().st_size


def test_read_ahead_of_ranges_asks_for_those_bytes_alone_in_the_order_given(tmp_path, monkeypatch):
    asked = _fadvise_calls(monkeypatch)
    file = tmp_path / "model.onnx_data"
    file.write_bytes(bytes(8 * prefetch.PIECE_BYTES))
    ranges = [(5 * prefetch.PIECE_BYTES, 2 * prefetch.PIECE_BYTES + 3), (100, 10)]
    prefetch.read_ahead(str(file), ranges)
    assert all(length <= prefetch.PIECE_BYTES for _, length, _ in asked)
    covered = [set(range(offset, offset + length)) for offset, length, _ in asked]
    wanted = set(range(5 * prefetch.PIECE_BYTES, 7 * prefetch.PIECE_BYTES + 3)) | set(range(100, 110))
    assert set().union(*covered) == wanted
    assert sum(map(len, covered)) == 2 * prefetch.PIECE_BYTES + 13  # each byte asked for once
    assert asked[0][0] == 5 * prefetch.PIECE_BYTES and asked[-1][:2] == (100, 10)


def test_files_are_read_in_the_order_asked_in_one_background_thread_past_a_missing_one(tmp_path, monkeypatch):
    missing, first, second = (str(tmp_path / name) for name in ("missing", "first", "second"))
    ours = {missing, first, second}
    read, threads, done = [], set(), threading.Event()

    def read_ahead(file: str, ranges) -> None:
        if file not in ours:  # another test's pipeline, still being read
            return
        read.append((file, ranges))
        threads.add(threading.current_thread())
        if file == missing:
            raise FileNotFoundError(file)
        if (file, ranges) == (first, [(8, 8)]):  # the last one asked for
            done.set()

    monkeypatch.setattr(os, "posix_fadvise", lambda *args: None, raising=False)
    monkeypatch.setattr(prefetch, "read_ahead", read_ahead)
    prefetch.prefetch([(missing, [(0, 8)]), (first, [(0, 8)])])
    prefetch.prefetch([(second, [(0, 8)]), (first, [(8, 8)])])
    assert done.wait(10)
    assert read == [(missing, [(0, 8)]), (first, [(0, 8)]), (second, [(0, 8)]), (first, [(8, 8)])]
    assert len(threads) == 1 and threading.current_thread() not in threads


def test_loading_asks_for_each_graphs_weights_in_the_order_a_call_runs_them(tiny_onnx_dir, monkeypatch):
    asked = []
    monkeypatch.setattr(sessions, "prefetch", lambda parts: asked.append(list(parts)))
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    order = ("text_encoder", "unet", "vae_decoder")
    assert [{file for file, _ in parts} for parts in asked] == [pipe._graphs[name].weight_files for name in order]
    assert all(ranges for parts in asked for _, ranges in parts)  # each is the external data the CPU session maps


def test_each_graphs_weights_are_asked_for_just_before_its_session_opens(tiny_onnx_dir, tmp_path, monkeypatch):
    # Opening reads the weights too (onnxruntime packs the products' weights again from them).
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(tmp_path / "cache"))
    Pipeline.load(tiny_onnx_dir, provider="cpu")  # writes the cache entries, which open sessions too
    events = []
    real_session = sessions.ort.InferenceSession

    def session(path, *args, **kwargs):
        events.append(("open", weight_files(path)))
        return real_session(path, *args, **kwargs)

    monkeypatch.setattr(sessions, "prefetch", lambda parts: events.append(("asked", {file for file, _ in parts})))
    monkeypatch.setattr(sessions.ort, "InferenceSession", session)
    Pipeline.load(tiny_onnx_dir, provider="cpu")
    assert [kind for kind, _ in events] == ["asked", "open"] * 3
    assert all(events[i][1] == events[i + 1][1] and events[i][1] for i in range(0, 6, 2))


def _onnx_ranges(graph_file: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """onnx's own reading of a cache entry: the ranges of the weights a product's kernel packs
    (each original and its packed copies), and those of the others."""
    model = onnx.load(str(graph_file), load_external_data=False)
    packed, other = [], []
    for tensor in model.graph.initializer:
        fields = {entry.key: entry.value for entry in tensor.external_data}
        if "location" not in fields:
            continue
        own = (int(fields["offset"]), int(fields["length"]))
        copies = [buffer.split(";")[:2] for key, value in fields.items() if key.startswith("prepacked_")
                  for buffer in value.split("|")[1:]]
        if copies:
            packed += [own, *((int(offset), int(length)) for offset, length in copies)]
        else:
            other.append(own)
    return packed, other


def test_weight_ranges_give_what_opening_reads_first_then_what_the_runs_read(tiny_onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(tmp_path / "cache"))
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    (data,) = pipe._graphs["unet"].weight_files  # the cache entry's data file
    entry = Path(data).parent / "model.onnx"
    packed, other = _onnx_ranges(entry)
    assert packed and other  # the tiny UNet has both kinds

    (first_file, opening), (second_file, running) = weight_ranges(entry)
    assert first_file == second_file == data

    def within(r, ranges):
        return any(start <= r[0] and r[0] + r[1] <= start + length for start, length in ranges)

    assert all(within(r, opening) for r in packed)
    assert all(within(r, opening) or within(r, running) for r in other)
    assert [r for r in other if within(r, running)]  # the runs' weights come after, most of them
    # Nothing else is read but the gaps of at most a page joined between neighbours.
    asked = sum(length for _, length in opening + running)
    assert sum(length for _, length in packed + other) <= asked <= sum(length for _, length in packed + other) + \
        4096 * (len(packed) + len(other))
    # The packed weights' originals, read only while opening, lie before the end of the file: a
    # read of the whole file in order would have asked for all of it before the runs' weights.
    assert sum(length for _, length in opening) < Path(data).stat().st_size


def _resident_bytes(path: Path) -> int:
    """How much of `path` the page cache holds (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        view = np.frombuffer(buf, dtype=np.uint8)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        resident = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), resident) == 0
        del view
    return int((np.frombuffer(resident, dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="drops a file from Linux's page cache, asks mincore")
def test_finding_where_inline_weights_lie_reads_their_headers_not_the_weights(tmp_path):
    # A model folder's graph with its weights inline (SD 1.5's text encoder: 0.49 GB) is walked at
    # each load for external-data locations, and once its cache entry exists nothing else reads it.
    weights = [numpy_helper.from_array(np.full((64, 1024), i, np.float32), f"w{i}") for i in range(80)]
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "inline", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], initializer=weights)
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with path.open("rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident_bytes(path) > path.stat().st_size // 2:
        pytest.skip(f"{tmp_path} is not on a disk (tmpfs?): its files can't leave the page cache")

    assert external_data_locations(path) == []
    # 80 tensors of 256 KB (20 MB): a header's page each (and the file's first), not a readahead window each.
    assert _resident_bytes(path) <= 100 * mmap.PAGESIZE
