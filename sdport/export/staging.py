"""Writing a model folder safely: build it in a temporary sibling of OUT, rename it into place.

An interrupted or failed write never leaves a half-written OUT; a killed one leaves only a hidden
`.OUT.partial-PID` folder, which the next write of the same OUT removes once PID is gone.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Callable

from sdport.errors import SdportError

Reporter = Callable[[str], None]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine); True when unsure, so nothing live is removed."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale_siblings(out: Path, report: Reporter | None = None) -> list[Path]:
    """Removes `.OUT.partial-PID` / `.OUT.old-PID` folders left by exports that were killed.

    A SIGKILL or a power cut cannot clean up; the next export of the same OUT does, but only for
    folders whose process is gone, so two exports running at once do not delete each other's work.
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if pid.isdigit() and path.is_dir() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                if report:
                    report(f"removed {path}, left by an export that was interrupted")
    return removed


def temporary_sibling(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise SdportError(
            f"cannot create {tmp} next to {out} ({exc.strerror or exc}); choose an OUT in a folder you can write to"
        ) from exc
    return tmp


def replace_folder(tmp: Path, out: Path) -> None:
    """Renames the finished folder into place; an old OUT (with --force) is removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
