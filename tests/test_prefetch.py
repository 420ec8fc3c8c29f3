"""Weight files read ahead into the page cache before a graph's first run (runtime/prefetch.py)."""

from __future__ import annotations

import os
import threading

from sdport.runtime import Pipeline, prefetch, sessions
from sdport.runtime.graph_files import weight_files

WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)


def test_read_ahead_asks_for_every_byte_in_pieces_the_kernel_reads_whole(tmp_path, monkeypatch):
    # Linux reads at most its readahead limit per call (128 KB or more): a larger piece would be
    # read only in part, and a gap would leave its pages to the run's page faults.
    asked = []
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", WILLNEED, raising=False)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: asked.append((offset, length, advice)),
                        raising=False)
    file = tmp_path / "model.onnx_data"
    file.write_bytes(bytes(3 * prefetch.PIECE_BYTES + 5))
    prefetch.read_ahead(str(file))
    assert {advice for _, _, advice in asked} == {WILLNEED}
    assert all(length <= 128 << 10 for _, length, _ in asked)
    assert [offset for offset, _, _ in asked] == [sum(n for _, n, _ in asked[:i]) for i in range(len(asked))]
    assert asked[-1][0] + asked[-1][1] >= file.stat().st_size > asked[-1][0]


def test_files_are_read_in_the_order_asked_in_one_background_thread_past_a_missing_one(tmp_path, monkeypatch):
    missing, first, second = (str(tmp_path / name) for name in ("missing", "first", "second"))
    ours = {missing, first, second}
    read, threads, done = [], set(), threading.Event()

    def read_ahead(file: str) -> None:
        if file not in ours:  # another test's pipeline, still being read
            return
        read.append(file)
        threads.add(threading.current_thread())
        if file == missing:
            raise FileNotFoundError(file)
        if file == second:
            done.set()

    monkeypatch.setattr(os, "posix_fadvise", lambda *args: None, raising=False)
    monkeypatch.setattr(prefetch, "read_ahead", read_ahead)
    prefetch.prefetch([missing, first])
    prefetch.prefetch([second])
    assert done.wait(10)
    assert read == [missing, first, second]
    assert len(threads) == 1 and threading.current_thread() not in threads


def test_loading_asks_for_each_graphs_weights_in_the_order_a_call_runs_them(tiny_onnx_dir, monkeypatch):
    asked = []
    monkeypatch.setattr(sessions, "prefetch", lambda files: asked.append(list(files)))
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    order = ("text_encoder", "unet", "vae_decoder")
    assert asked == [sorted(pipe._graphs[name].weight_files) for name in order]
    assert all(asked)  # each is the external data the CPU session maps


def test_each_graphs_weights_are_asked_for_just_before_its_session_opens(tiny_onnx_dir, tmp_path, monkeypatch):
    # Opening reads the weights too (onnxruntime packs the products' weights again from them).
    monkeypatch.setenv("SDPORT_ORT_CACHE", str(tmp_path / "cache"))
    Pipeline.load(tiny_onnx_dir, provider="cpu")  # writes the cache entries, which open sessions too
    events = []
    real_session = sessions.ort.InferenceSession

    def session(path, *args, **kwargs):
        events.append(("open", sorted(weight_files(path))))
        return real_session(path, *args, **kwargs)

    monkeypatch.setattr(sessions, "prefetch", lambda files: events.append(("asked", list(files))))
    monkeypatch.setattr(sessions.ort, "InferenceSession", session)
    Pipeline.load(tiny_onnx_dir, provider="cpu")
    assert [kind for kind, _ in events] == ["asked", "open"] * 3
    assert all(events[i][1] == events[i + 1][1] and events[i][1] for i in range(0, 6, 2))
