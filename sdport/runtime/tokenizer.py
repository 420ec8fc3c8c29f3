"""CLIP's tokenizer with the `tokenizers` library alone: prompts -> int64 ids [N, 77].

Matches what diffusers' StableDiffusionPipeline gets from transformers' CLIPTokenizer called
as `tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`. Reads either
layout a model folder may have: `tokenizer.json` (transformers' fast format, what sdport
exports) or optimum's `vocab.json` + `merges.txt` with no `tokenizer.json`, from which the
same BPE pipeline transformers builds is rebuilt here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from sdport.errors import UsageError, first_line
from sdport.models.manifest import ManifestError

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 77  # CLIP's text encoder has 77 positions
END_OF_WORD = "</w>"
# transformers' CLIPTokenizer defaults, used where the configs do not name a token.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# transformers' CLIPTokenizer pre-tokenizer pattern (its own copy of OpenAI's regex).
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")  # AddedToken's options
# The later file wins, as in transformers.
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class ClipTokenizer:
    """CLIP BPE tokenizer: `ClipTokenizer.load(folder).encode(prompts)` -> int64 [N, max_length]."""

    def __init__(
        self, tokenizer: Tokenizer, bos_id: int, eos_id: int, pad_id: int, max_length: int
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.max_length = max_length
        tokenizer.no_truncation()  # truncation and padding are done in `encode`, where drops are counted
        tokenizer.no_padding()

    @classmethod
    def load(cls, folder: Path, max_length: int | None = None) -> ClipTokenizer:
        """Loads the tokenizer directory of a model folder (usually `<model>/tokenizer`).

        Reads `tokenizer.json` if present, else builds CLIP's BPE from `vocab.json` + `merges.txt`.
        Special tokens and `model_max_length` come from `tokenizer_config.json` and
        `special_tokens_map.json`; `max_length` (the manifest's `max_tokens`) overrides the latter.
        Raises ManifestError, naming the folder and the fix, for anything that is not a CLIP tokenizer.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ManifestError(
                f"{folder}: tokenizer folder not found; the model folder needs the tokenizer files "
                f"(tokenizer.json, or vocab.json + merges.txt) there; re-export the model"
            )
        config = _read_configs(folder)
        special = {k: _added_token(config.get(k, v), folder) for k, v in DEFAULT_SPECIAL_TOKENS.items()}
        if (folder / "tokenizer.json").exists():
            tokenizer = _from_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            tokenizer = _from_vocab_and_merges(folder, special["unk_token"].content)
        else:
            raise ManifestError(
                f"{folder}: no tokenizer.json and no vocab.json + merges.txt; copy the tokenizer "
                f"files of the source model there or re-export the model"
            )
        _check_clip_bpe(tokenizer, folder)
        ids: dict[str, int] = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token = special[key].content
            token_id = tokenizer.token_to_id(token)  # looked up before registering, which would add it
            if token_id is None:
                raise ManifestError(
                    f"{folder}: {key} {token!r} is not in the vocabulary, so this is not a CLIP "
                    f"tokenizer (or its {' / '.join(CONFIG_FILES)} name the wrong token); use the "
                    f"tokenizer folder of the source model"
                )
            ids[key] = token_id
        _add_special_tokens(tokenizer, config, special, folder)
        if tokenizer.post_processor is None:  # optimum's layout; `encode` adds them itself anyway
            tokenizer.post_processor = processors.RobertaProcessing(
                (special["eos_token"].content, ids["eos_token"]),
                (special["bos_token"].content, ids["bos_token"]),
                trim_offsets=False,
                add_prefix_space=False,
            )
        length = max_length if max_length is not None else _model_max_length(config)
        if length < 2:
            raise ManifestError(
                f"{folder}: max length {length} leaves no room for the start and end tokens; "
                f"set max_tokens in the manifest to the text encoder's positions (77)"
            )
        return cls(tokenizer, ids["bos_token"], ids["eos_token"], ids["pad_token"], length)

    def encode(self, prompts: list[str], labels: list[str] | None = None) -> np.ndarray:
        """Returns int64 ids [N, max_length]: start token, text, end token, then the pad id.

        Prompts longer than `max_length - 2` tokens are cut, keeping the end token, and a
        warning on the `sdport.runtime.tokenizer` logger says how many tokens, and which text,
        were dropped (diffusers logs the same); it names prompt i by `labels[i]` ("prompt i"
        without labels).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise UsageError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        room = self.max_length - 2  # text tokens between the start and end tokens
        encodings = self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        for i, (prompt, encoding) in enumerate(zip(prompts, encodings)):
            text = encoding.ids[:room]
            ids[i, 0] = self.bos_id
            ids[i, 1 : len(text) + 1] = text
            ids[i, len(text) + 1] = self.eos_id
            dropped = len(encoding.ids) - room
            if dropped > 0:
                start, end = encoding.offsets[room][0], encoding.offsets[-1][1]
                logger.warning(
                    "%s is %d tokens, CLIP reads %d: dropped the last %d tokens: %r",
                    labels[i] if labels else f"prompt {i}", len(encoding.ids), room, dropped, prompt[start:end],
                )
        return ids


def _read_configs(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json overlaid with special_tokens_map.json (either may be missing)."""
    config: dict[str, Any] = {}
    for name in CONFIG_FILES:
        path = folder / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc}); re-export the model") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object; re-export the model")
        config.update({k: v for k, v in data.items() if v is not None})
    return config


def _added_token(spec: Any, folder: Path) -> AddedToken:
    """A special token as the configs write it: a string, or a dict with "content" and flags."""
    if isinstance(spec, str):
        return AddedToken(spec, special=True, normalized=False)
    if isinstance(spec, dict) and isinstance(spec.get("content"), str):
        flags = {k: bool(spec[k]) for k in TOKEN_FLAGS if k in spec}
        return AddedToken(spec["content"], **{"special": True, **flags})
    raise ManifestError(
        f"{folder}: special token {spec!r} in {' / '.join(CONFIG_FILES)} is neither a string nor an "
        f"object with \"content\"; re-export the model"
    )


def _model_max_length(config: dict[str, Any]) -> int:
    value = config.get("model_max_length")
    # transformers writes a huge sentinel (1e30) when no length was set.
    if isinstance(value, (int, float)) and 0 < value < 1e6:
        return int(value)
    return DEFAULT_MAX_LENGTH


def _from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every parse error
        raise ManifestError(
            f"{path}: not a readable tokenizer.json ({first_line(exc)}); replace it with the source model's "
            f"tokenizer.json, or delete it to use vocab.json + merges.txt"
        ) from exc


def _from_vocab_and_merges(folder: Path, unk_token: str) -> Tokenizer:
    """Builds the pipeline transformers' CLIPTokenizer.__init__ builds, from optimum's files."""
    try:
        bpe = models.BPE.from_file(
            str(folder / "vocab.json"), str(folder / "merges.txt"), dropout=None,
            continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD, fuse_unk=False,
            unk_token=unk_token,
        )
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise ManifestError(
            f"{folder}: vocab.json + merges.txt do not load as a BPE vocabulary ({first_line(exc)}); copy "
            f"them again from the source model"
        ) from exc
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _check_clip_bpe(tokenizer: Tokenizer, folder: Path) -> None:
    model = tokenizer.model
    if not isinstance(model, models.BPE):
        raise ManifestError(
            f"{folder}: the tokenizer is a {type(model).__name__} model, not CLIP's BPE; use the "
            f"tokenizer folder of the Stable Diffusion model the text encoder came from"
        )
    if model.end_of_word_suffix != END_OF_WORD:
        raise ManifestError(
            f"{folder}: the BPE tokenizer has end-of-word suffix {model.end_of_word_suffix!r}, "
            f"CLIP's is {END_OF_WORD!r}; this is not a CLIP tokenizer (GPT-2's?); use the source "
            f"model's tokenizer folder"
        )


def _add_special_tokens(
    tokenizer: Tokenizer, config: dict[str, Any], special: dict[str, AddedToken], folder: Path
) -> None:
    """Registers the special tokens as transformers does, so literal ones in text match them.

    Every special token is matched in the text before BPE; with SD 2.x's pad token "!" that
    turns each "!" of a prompt into id 0, which is what transformers (hence diffusers) does.
    """
    declared = config.get("added_tokens_decoder")
    declared = declared.values() if isinstance(declared, dict) else []
    # One token per content; a later definition wins, as in transformers: SD 1.x's config has
    # eos "<|endoftext|>" normalized (matching "<|ENDOFTEXT|>") and pad the plain string, which
    # wins; an `added_tokens_decoder` entry (transformers >= 4.34 writes one) wins over both.
    ordered = [*special.values(), *(_added_token(spec, folder) for spec in declared)]
    tokens = {t.content: t for t in ordered}
    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    new = [t for content, t in tokens.items() if content not in present]  # tokenizer.json's are kept
    tokenizer.add_special_tokens([t for t in new if t.special])
    tokenizer.add_tokens([t for t in new if not t.special])
