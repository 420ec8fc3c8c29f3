"""The real CLIP BPE vocabulary, taken from the open-clip-torch wheel without installing it.

open-clip-torch ships OpenAI's `bpe_simple_vocab_16e6.txt.gz`; its own dependencies (torch
vision, timm, ...) are not needed to read one gzip file, so the wheel is downloaded with
`pip download --no-deps` and opened as a zip.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sdport.cache import cache_root

OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# OpenAI's tokenizer keeps the first 49152 - 256 - 2 merges of the file (the first line is a header).
MERGE_COUNT = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(BPE_MEMBER)


def _from_installed_open_clip() -> bytes | None:
    import importlib.util

    spec = importlib.util.find_spec("open_clip")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.exists():
            return path.read_bytes()
    return None


def clip_bpe_gz() -> bytes:
    """Returns the gzipped BPE merges file: $SDPORT_CLIP_BPE, an installed open_clip, or the wheel."""
    explicit = os.environ.get("SDPORT_CLIP_BPE")
    if explicit:
        return Path(explicit).read_bytes()
    installed = _from_installed_open_clip()
    if installed is not None:
        return installed
    cached = cache_root() / "bpe_simple_vocab_16e6.txt.gz"
    if cached.exists():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, OPEN_CLIP_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("open_clip_torch-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                "could not fetch the CLIP BPE vocabulary: `pip download --no-deps "
                f"{OPEN_CLIP_WHEEL}` failed ({result.stderr.strip().splitlines()[-1:]}); "
                "set SDPORT_CLIP_BPE to a copy of bpe_simple_vocab_16e6.txt.gz"
            )
        data = _from_wheel(wheels[0])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(".tmp")
    tmp_path.write_bytes(data)
    tmp_path.replace(cached)
    return data


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Builds CLIP's vocabulary (49408 tokens) and merge list the way OpenAI's tokenizer does."""
    lines = gzip.decompress(clip_bpe_gz()).decode("utf-8").split("\n")
    merges = lines[1 : MERGE_COUNT + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_vocab_files(folder: Path) -> tuple[Path, Path]:
    """Writes `vocab.json` and `merges.txt` (the format transformers' CLIPTokenizer reads)."""
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path
