"""Weight files read into the kernel's page cache as their session opens.

On CPU onnxruntime maps a graph's external weights and reads them in place (packed ones too, as
saved in the pre-optimized cache: graph_cache.preoptimized_options). When the files are not in the
page cache (after a reboot, or once the kernel has dropped them), opening the session and the
first run read them from disk by page faults, a readahead window at a time, and wait for each.
Asked for in the background just before each session opens (sessions.open_session), they are
read ahead of both instead. SD 1.5-sized fp32 at 512 px on 2 cores, one-step text-to-image from
process start with the weight files out of the page cache: 11.9-13.2 s against 13.4-16.1 s with
no read-ahead, and 12.5-13.3 s when they were asked for only once the session had opened, as
before (2026-11-29, runs taken in turn). With the files cached it changes nothing measurable.

The price, where the filesystem caches files in large folios (ext4 on Linux 6.16 and later, as
here; XFS): pages read this way stay cached as 4 KB pages, where the session's own page faults
or a plain read leave folios of up to 2 MB, and every later process that maps them pays for it
until they leave the cache. The same one-step image with its files cached took 10.7-11.7 s after
they were read this way, against 9.3-10.1 s after page faults had read them (three rounds of two
processes each); the UNet's session opened in 1.03-1.25 s instead of 0.92-0.98 s, and its steps
ran about 3% slower. Kept, as most kernels cache ext4 files in 4 KB pages however they are read,
and a machine short of memory reads its weights from disk at every start.

Measured and dropped: reading the files another way, which caches them in large folios.
WILLNEED queues all the reads at once. Read in order instead, by sendfile to /dev/null (through
the kernel's own readahead) or MADV_POPULATE_READ, the UNet's first run from disk was about as
slow as with no read-ahead (5.8-7.3 s against 5.2-6.7 s, 2026-11-27), and the one-step image
from disk with sendfile in one thread took 15.6-17.2 s against 15.3-16.1 s with none
(2026-11-29). Four sendfile slices of a file
read at once reached the disk's 2.8-3.2 GB/s alone, but beside the UNet's session opening they
took 3.1 s instead of 1.5 s and held the opening to 5.4 s (2.0-2.2 s with WILLNEED).
MADV_POPULATE_READ on a MADV_HUGEPAGE mapping, four threads: the opening as fast as with
WILLNEED, but the next process found the pages gone from the cache. Measured again later that day
(benchmarks/RESULTS.md): sendfile in 8 MB calls started from disk in 12.3-12.6 s in one set of
three rounds and in 15.3-16.2 s in the next (WILLNEED 12.5-13.2 s throughout); plain reads, the
opening's ranges first or not, in 13.3-14.4 s. The 4 KB pages cost the kernel's time, not the
reads': a cached start took 3.4-3.5 s of system CPU after WILLNEED had read its files, 1.0-1.1 s
after a plain read. (sendfile to /dev/null may not wait for the pages: a process mapping the file
right after four sendfile slices of it took 6.4 s to touch each page, against 0.03 s after
MADV_POPULATE_READ.) MADV_POPULATE_READ again, without MADV_HUGEPAGE, four threads on a quarter
each of the 4.5 GB UNet entry: 1.3-1.4 s alone (WILLNEED 1.5-1.9 s), the pages cached as 2 MB
folios that later processes mapped whole (0 major faults). In the one-step image from disk it lost:
the pipeline loaded in 2.9-4.9 s against 2.4-2.9 s with WILLNEED, the first UNet run took 4.3-5.4
s against 3.7-4.0 s (four threads by slices of the weight ranges: 4.3 s and 5.3 s), 2026-11-29.

One thread reads the files in the order they were asked for: the order the pipeline opens its
graphs, which is the order a call runs them; within a graph, what opening its session reads
first (graph_files.weight_ranges). Nothing happens where posix_fadvise is missing (Windows, macOS).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Sequence

# posix_fadvise(WILLNEED) reads at most the device's readahead limit per call (Linux caps it at
# max(read_ahead_kb, max_sectors_kb), 128 KB or more), so a file is asked for in pieces no larger
# than that. Measured on SD 1.5's UNet: 128 KB and 8 MB pieces take the same time and CPU.
PIECE_BYTES = 128 << 10

Ranges = Sequence[tuple[int, int]]  # (offset, length) in a file

_parts: queue.SimpleQueue[tuple[str, Ranges]] = queue.SimpleQueue()
_reader: threading.Thread | None = None
_reader_lock = threading.Lock()


def prefetch(parts: Iterable[tuple[str | os.PathLike, Ranges]]) -> None:
    """Starts reading `parts` into the page cache in the background, after any asked for before:
    (file, its (offset, length) ranges)."""
    global _reader
    parts = [(os.fspath(file), ranges) for file, ranges in parts]
    if not parts or not hasattr(os, "posix_fadvise"):
        return
    for part in parts:
        _parts.put(part)
    with _reader_lock:
        if _reader is None:
            _reader = threading.Thread(target=_read_parts, name="sdport-prefetch", daemon=True)
            _reader.start()


def _forget_reader() -> None:
    # A forked child has the parent's queue and lock, but not its thread.
    global _parts, _reader, _reader_lock
    _parts, _reader, _reader_lock = queue.SimpleQueue(), None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_reader)


def _read_parts() -> None:
    while True:
        file, ranges = _parts.get()
        try:
            read_ahead(file, ranges)
        except OSError:  # gone or unreadable: the session's own read reports it, if it matters
            pass


def read_ahead(file: str, ranges: Ranges) -> None:
    """Asks the kernel to read `ranges` of `file` into the page cache; returns as the reads are
    queued."""
    fd = os.open(file, os.O_RDONLY)
    try:
        for start, length in ranges:
            for offset in range(start, start + length, PIECE_BYTES):
                os.posix_fadvise(fd, offset, min(PIECE_BYTES, start + length - offset), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
