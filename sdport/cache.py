"""Where sdport keeps what it can rebuild: the CLIP vocabulary, pre-optimized graphs, verified digests."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SDPORT_CACHE, else $XDG_CACHE_HOME/sdport, else ~/.cache/sdport (an empty variable counts as unset)."""
    root = os.environ.get("SDPORT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdport"
