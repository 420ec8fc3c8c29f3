"""The graph files' sha256 against sdport.json, before onnxruntime reads them.

The manifest is written by whoever wrote the folder, so a matching digest proves the files are
the ones exported (no truncated download, no bit rot, no half-copied folder), not that their
author is honest; the external-data and symlink checks in graph_files.py are the safety checks.

Hashing an SD 1.5 UNet (3.4 GB) costs 5-10 s, about as long as creating its session, so every
load would pay it twice. A file that verified once is remembered in a small cache keyed by
(path, size, mtime, ctime, inode): any rewrite, copy, `touch` or rename changes the key and the
file is hashed again, so the cache only skips re-reading bytes that have not been touched since
they matched. Files under CACHE_MIN_BYTES are always hashed (milliseconds). The cache lives in
$SDPORT_CACHE or $XDG_CACHE_HOME/sdport (default ~/.cache/sdport); a cache that cannot be read
or written is ignored. `Pipeline.load(..., verify=False)` skips the check for hosts that verified themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from sdport.cache import cache_root
from sdport.models.manifest import ManifestError, inside

CACHE_MIN_BYTES = 16 << 20
CACHE_ENTRIES = 256  # the oldest are dropped beyond this
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def cache_file() -> Path:
    return cache_root() / "sha256-verified.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stat_identity(stat: os.stat_result) -> str:
    """A file's version without reading it: size, mtime, ctime and inode (a rewrite, copy, `touch`
    or rename changes it). Also the session cache's key for large files (graph_cache.py)."""
    return f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"


def _key(path: Path, stat: os.stat_result) -> str:
    return f"{path}|{stat_identity(stat)}"


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _write_cache(entries: dict[str, str]) -> None:
    path = cache_file()
    kept = dict(list(entries.items())[-CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(kept, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def verify_sha256(folder: Path, component: str, digests: dict[str, str], use_cache: bool = True) -> None:
    """Raises ManifestError naming the file unless each of `digests` (relative path -> hex) matches."""
    cache = _read_cache() if use_cache else {}
    changed = False
    for relative, expected in digests.items():
        expected = expected.lower()
        if not HEX_DIGEST.fullmatch(expected):
            raise ManifestError(
                f"{component}: sdport.json lists sha256 {expected!r} for {relative}, not a 64-digit hex "
                f"digest; re-export the model"
            )
        path = inside(folder, relative)
        if not path.is_file():
            raise ManifestError(
                f"{component}: {relative} is listed in sdport.json but missing from {folder}; copy or "
                f"download the model folder again, or re-export it"
            )
        stat = path.stat()
        key = _key(path, stat)
        if cache.get(key) == expected:
            continue
        actual = file_sha256(path)
        if actual != expected:
            raise ManifestError(
                f"{component}: {relative} has sha256 {actual[:12]}..., sdport.json says {expected[:12]}...; "
                f"the file is corrupt or incomplete (an interrupted download or copy?): copy or download "
                f"the model folder again, or re-export it"
            )
        if use_cache and stat.st_size >= CACHE_MIN_BYTES:
            cache.pop(key, None)
            cache[key] = actual
            changed = True
    if changed:
        _write_cache(cache)
