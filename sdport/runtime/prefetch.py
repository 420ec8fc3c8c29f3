"""Weight files read into the kernel's page cache as their session opens.

On CPU onnxruntime maps a graph's external weights and reads them in place (packed ones too, as
saved in the pre-optimized cache: sessions.preoptimized_options). When the files are not in the
page cache (after a reboot, or once the kernel has dropped them), opening the session and the
first run read them from disk by page faults, a readahead window at a time, and wait for each.
Asked for in the background just before each session opens (sessions.open_session), they are
read ahead of both instead. SD 1.5-sized fp32 at 512 px on 2 cores, one-step text-to-image from
process start with the weight files out of the page cache: 12.1-12.9 s against 12.5-13.3 s when
they were asked for once the session had opened (Pipeline.load 3.0-3.5 s against 3.7-4.9 s; six
runs each, in turn, 2026-11-29). That first form had brought the same image from 10.7-11.1 s
with no read-ahead to 9.7-10.0 s on the machine of 2026-11-27. With the files cached neither
changes anything measurable. The price: pages read this way stay cached as 4 KB pages, so a later process maps
them 4 KB at a fault instead of up to 2 MB: that UNet's session took 1.03-1.25 s to open instead
of 0.92-0.98 s, and its first 256 px run 1.04 s instead of 0.83 s.

Read instead by sendfile to /dev/null (the kernel's own readahead, which caches large folios),
four slices of a file at once reached the disk's 2.8-3.2 GB/s on their own, but alongside the
UNet's session opening they took 3.1 s instead of 1.5 s and held the opening to 5.4 s (2.4-2.8 s
with no read-ahead, 2.0-2.2 s with WILLNEED); one slice, 2.6 s (2026-11-29).

One thread reads the files in the order they were asked for: the order the pipeline opens its
graphs, which is the order a call runs them. Nothing happens where posix_fadvise is missing
(Windows, macOS).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable

# posix_fadvise(WILLNEED) reads at most the device's readahead limit per call (Linux caps it at
# max(read_ahead_kb, max_sectors_kb), 128 KB or more), so a file is asked for in pieces no larger
# than that. Measured on SD 1.5's UNet: 128 KB and 8 MB pieces take the same time and CPU.
# WILLNEED queues all the reads at once; reading the file in order instead (sendfile to /dev/null,
# or MADV_POPULATE_READ, which cache it in large folios where WILLNEED uses 4 KB pages) left the
# UNet's first run from disk about as slow as with none (5.8-7.3 s against 5.2-6.7 s).
PIECE_BYTES = 128 << 10

_files: queue.SimpleQueue[str] = queue.SimpleQueue()
_reader: threading.Thread | None = None
_reader_lock = threading.Lock()


def prefetch(files: Iterable[str | os.PathLike]) -> None:
    """Starts reading `files` into the page cache in the background, after any asked for before."""
    global _reader
    paths = [os.fspath(file) for file in files]
    if not paths or not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        _files.put(path)
    with _reader_lock:
        if _reader is None:
            _reader = threading.Thread(target=_read_files, name="sdport-prefetch", daemon=True)
            _reader.start()


def _forget_reader() -> None:
    # A forked child has the parent's queue and lock, but not its thread.
    global _files, _reader, _reader_lock
    _files, _reader, _reader_lock = queue.SimpleQueue(), None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_reader)


def _read_files() -> None:
    while True:
        file = _files.get()
        try:
            read_ahead(file)
        except OSError:  # gone or unreadable: the session's own read reports it, if it matters
            pass


def read_ahead(file: str) -> None:
    """Asks the kernel to read all of `file` into the page cache; returns as the reads are queued."""
    fd = os.open(file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, PIECE_BYTES):
            os.posix_fadvise(fd, offset, PIECE_BYTES, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
