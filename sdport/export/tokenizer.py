"""Writes the tokenizer folder of an exported model, readable by every host.

`tokenizer.json` serves the `tokenizers` library (sdport's runtime, tokenizers bindings in other
languages); `vocab.json` + `merges.txt` + `special_tokens_map.json` serve tools that read the
older layout (optimum, hand-written BPE in other-language hosts). The folder is checked before
export returns: transformers reloads it, and sdport's runtime tokenizer, with the same ids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sdport.errors import SdportError

# Prompts the round trip is checked on: case, punctuation, digits, unicode, a literal special
# token, SD 2.x's pad "!", and one past 77 tokens.
PROBE_PROMPTS = [
    "a photo of an astronaut riding a horse on Mars",
    "(masterpiece:1.2), best quality!!, 8k, ultra-detailed",
    "Ça déjà vu — 東京の夜景, ΟΔΟΣ, москва 🚀 <|endoftext|> it's",
    "",
    " ".join(f"word{i}" for i in range(60)),
]


def _special_tokens_map(tokenizer: Any) -> dict[str, str]:
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name, None)}


def _vocab_and_merges(tokenizer_json: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    """vocab.json's dict and merges.txt's lines ("a b") from tokenizer.json's BPE model."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise SdportError(f"tokenizer: expected a BPE model (CLIP's), got {model.get('type')!r}")
    lines = []
    for merge in model["merges"]:  # pairs in tokenizers >= 0.20, "a b" strings before
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in part for part in pair):
            raise SdportError(f"tokenizer: merge {merge!r} has a token with a space; merges.txt cannot hold it")
        lines.append(" ".join(pair))
    return dict(model["vocab"]), lines


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Writes a transformers CLIPTokenizer (v5, fast) to `folder` in both layouts and checks it.

    Files: tokenizer.json, tokenizer_config.json (transformers' own save), special_tokens_map.json,
    vocab.json and merges.txt (`#version: 0.2` header, as transformers and optimum write it).
    Raises SdportError if transformers or sdport's runtime reads back different ids.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    vocab, merges = _vocab_and_merges(json.loads(tokenizer.backend_tokenizer.to_str()))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = json.dumps(_special_tokens_map(tokenizer), indent=2, ensure_ascii=False)
    (folder / "special_tokens_map.json").write_text(special + "\n", encoding="utf-8")
    _check_round_trip(tokenizer, folder)


def _check_round_trip(tokenizer: Any, folder: Path) -> None:
    """Fails the export, not the user, if the written folder tokenizes differently."""
    import numpy as np
    from transformers import CLIPTokenizer

    from sdport.runtime.tokenizer import ClipTokenizer

    length = int(tokenizer.model_max_length)
    expected = np.asarray(
        tokenizer(PROBE_PROMPTS, padding="max_length", max_length=length, truncation=True).input_ids
    )
    reloaded = CLIPTokenizer.from_pretrained(folder)
    readers = {
        "transformers": lambda: np.asarray(
            reloaded(PROBE_PROMPTS, padding="max_length", max_length=length, truncation=True).input_ids
        ),
        "sdport runtime": lambda: ClipTokenizer.load(folder, max_length=length).encode(PROBE_PROMPTS),
    }
    runtime_log = logging.getLogger("sdport.runtime.tokenizer")
    level = runtime_log.level
    runtime_log.setLevel(logging.ERROR)  # the long probe's truncation warning is expected here
    try:
        results = {reader: encode() for reader, encode in readers.items()}
    finally:
        runtime_log.setLevel(level)
    for reader, got in results.items():
        if got.shape != expected.shape or not np.array_equal(got, expected):
            bad = next(i for i in range(len(PROBE_PROMPTS)) if not np.array_equal(got[i], expected[i]))
            raise SdportError(
                f"tokenizer: {folder} read back by {reader} gives other ids for {PROBE_PROMPTS[bad]!r} "
                f"({got[bad].tolist()[:12]}... vs {expected[bad].tolist()[:12]}...); the tokenizer "
                f"cannot be saved faithfully; report this with the source model's tokenizer files"
            )
