"""A command run under a memory cap (a Linux memory cgroup): whether a machine with that little
memory can run it, and how fast.

Peak RSS counts a model's memory-mapped weights, clean copies of the file that the kernel may drop
and read again when memory is short, as fully as memory a process wrote. A cgroup's limit caps
all of a process's memory, the page cache it reads included, and makes the kernel reclaim within
it: the same run then either completes, paying for what it had to read again, or is killed (the
kernel's OOM killer, rc 137) when what it wrote alone does not fit.

The kernel charges a page-cache page to the cgroup of the process that first read it, so a cap
binds on a model's files only when the capped process reads them from disk: callers drop them
from the page cache first. The libraries both sides load (PyTorch's ~1 GB of them, onnxruntime's
~50 MB) stay cached and charged elsewhere, which leaves them out of the cap. Needs root (or a
delegated cgroup) and the memory controller, v1 (/sys/fs/cgroup/memory) or v2; `unavailable()`
says why not otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")
_MB = 1 << 20


class MemoryCgroup:
    """A fresh memory cgroup under this process's own, capped at `limit_mb` (swap included), for
    one command; removed by close()."""

    def __init__(self, limit_mb: int) -> None:
        v1 = _v1_parent()  # where both are mounted (hybrid), v1 holds the memory controller
        parent = v1 or _v2_parent()
        self.v2 = v1 is None
        if parent is None:
            raise OSError("no memory cgroup controller mounted")
        self.path = parent / f"sdport-bench-{os.getpid()}-{time.monotonic_ns()}"
        self.path.mkdir()
        try:
            limit = str(limit_mb * _MB)
            if self.v2:
                self._write("memory.max", limit)
                self._write("memory.swap.max", "0", optional=True)
            else:
                self._write("memory.limit_in_bytes", limit)
                self._write("memory.memsw.limit_in_bytes", limit, optional=True)  # only with swap accounting
        except OSError:
            self.close()
            raise

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        file = self.path / name
        if optional and not file.exists():
            return
        file.write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def command(self, command: list[str]) -> list[str]:
        """`command`, run by a shell that first moves itself into this cgroup (so everything the
        command allocates is charged to it, from its first page)."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *command]

    def peak_mb(self) -> float | None:
        """The most memory the cgroup held at once (memory.peak needs Linux 5.19 on v2)."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int(self._read(name)) / _MB
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        """How many of its processes the OOM killer ended (memory.events on v2, oom_control on v1)."""
        try:
            text = self._read("memory.events" if self.v2 else "memory.oom_control")
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def close(self) -> None:
        try:
            self.path.rmdir()  # its page-cache charges move to the parent
        except OSError:
            pass


def _own_cgroup(controller: str) -> str | None:
    """This process's cgroup path in `controller`'s hierarchy ("" for v2's unified one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):  # v2's line has none: "0::/path"
            return path
    return None


def _v1_parent() -> Path | None:
    own = _own_cgroup("memory")
    base = _ROOT / "memory"
    if own is None or not (base / "memory.limit_in_bytes").exists():
        return None
    return base / own.lstrip("/")


def _v2_parent() -> Path | None:
    own = _own_cgroup("")
    if own is None or not (_ROOT / "cgroup.controllers").exists():
        return None
    parent = _ROOT / own.lstrip("/")
    subtree = parent / "cgroup.subtree_control"
    return parent if subtree.exists() and "memory" in subtree.read_text().split() else None


def unavailable() -> str | None:
    """Why a capped run can't be made here, or None when it can."""
    if not Path("/proc/self/cgroup").exists():
        return "not Linux"
    try:
        MemoryCgroup(64).close()
    except (OSError, ValueError) as e:
        return f"no writable memory cgroup ({e})"
    return None


def run_capped(command: list[str], limit_mb: int) -> dict:
    """Runs `command` under a cap of `limit_mb`: completed (exit status 0), killed_by_oom,
    returncode, started_at (time.time()), wall_s, cgroup_peak_mb, and its stdout (for the
    worker's result)."""
    group = MemoryCgroup(limit_mb)
    try:
        started = time.time()
        process = subprocess.run(group.command(command), capture_output=True, text=True)
        wall = time.time() - started
        kills = group.oom_kills()
        return {"limit_mb": limit_mb, "completed": process.returncode == 0, "returncode": process.returncode,
                "killed_by_oom": bool(kills), "started_at": started, "wall_s": wall, "cgroup_peak_mb": group.peak_mb(),
                "stdout": process.stdout, "stderr_tail": process.stderr[-2000:]}
    finally:
        group.close()
