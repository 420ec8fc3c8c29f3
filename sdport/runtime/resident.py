"""What a process keeps resident that it need not: weights' mapped pages and the C heap's free pages.

onnxruntime memory-maps a graph's external weights and reads them in place (from the
pre-optimized cache the packed ones too, see graph_cache.preoptimized_options), so once touched
they count in the process's resident memory until it ends: the text encoder's 0.3 GB stay
resident through every UNet step. Those pages are clean copies of the file, so after a graph's
last run for a while they are dropped from this process (madvise MADV_DONTNEED); they stay in the
kernel's page cache and come back on the next run by a page fault, not a disk read (15 ms for the
SD 1.5 text encoder's 324 MB on 2 cores).
"""

from __future__ import annotations

import sys

_MADV_DONTNEED = 4  # Linux; the call is skipped elsewhere
_HEX_DIGITS = frozenset("0123456789abcdef")


def file_mappings(paths: frozenset[str] | None = None) -> list[dict]:
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

        mappings = file_mappings(files)
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, ValueError, IndexError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for m in mappings:
        if m["path"] in files and m.get("Anonymous", 1) == 0 and m.get("Rss", 0) > 0:
            madvise(m["start"], m["end"] - m["start"], _MADV_DONTNEED)


def trim_heap() -> None:
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
