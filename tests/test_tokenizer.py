"""Tokenizer parity: sdport's runtime tokenizer against transformers' CLIPTokenizer, called as
diffusers' StableDiffusionPipeline calls it, on the folders sdport and optimum write."""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from sdport.models.manifest import ManifestError
from sdport.runtime.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")

MAX_LENGTH = 77
CAT = "cat "  # one token ("cat</w>"), to build prompts of an exact length

PROMPTS = [
    # plain and mixed case
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT Riding A Horse On Mars",
    "iPhone McDonald's O'Neil DeLorean",
    "it's they're we've I'm you'll he'd IT'S THEY'RE",
    "portrait of a cyberpunk samurai, neon lights, rain",
    # punctuation, digits, weights syntax
    "(masterpiece:1.2), (best quality:1.4), [ugly], {detailed}",
    "((((extremely detailed)))), <lora:foo:0.8>, [[blurry]]",
    "!!!???...,,,;;;:::---___",
    "hello!!! wow!! great! ! !! ?!",
    "a.b.c-d_e/f\\g|h~i`j^k",
    "3.14159 2048x2048 8k 4K 1920 x 1080 100% 50/50",
    "0123456789 00 007 1e-5 -3 +4 #1 $5 €6 £7 ¥8",
    "@user #hashtag $money %percent ^caret &amp *star",
    "'quoted' \"double\" `back` ‘curly’ “curly”",
    "a -- b --- c ... d …",
    # whitespace
    "",
    " ",
    "     ",
    "\t\n\r ",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "  leading and trailing  ",
    "\u00a0non\u00a0breaking\u2003em\u2003space\u3000ideographic",
    # unicode
    "café naïve façade résumé Ångström Øresund",
    "cafe\u0301 decomposed e\u0301 vs é composed",
    "Straße Ärger Öl Übermut",
    "東京の夜景、桜の花びら",
    "一只猫坐在窗台上，阳光明媚。",
    "고양이가 창가에 앉아 있다",
    "ΟΔΟΣ ΟΔΥΣΣΕΥΣ Σίσυφος ΣΟΦΟΣ",
    "ὁδός Ἀθῆναι σοφός",
    "Москва ЗИМОЙ, красивый закат",
    "قطة جميلة تجلس على النافذة",
    "שלום עולם",
    "नमस्ते दुनिया",
    "ไทย ภาษา",
    "ﬁ ligature ﬀ ½ ² ³ ™ ©",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    # emoji
    "🚀 rocket 🌕 moon 🐱‍👤 ninja cat",
    "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇯🇵 flag",
    "❤️❤️❤️ hearts ✨✨",
    # HTML, URLs, code-like
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;x&quot; &#39;y&#39; &nbsp;",
    "<b>bold</b> <i>italic</i> <br/>",
    "https://example.com/path?query=1&b=2#frag",
    "www.artstation.com/artwork/abc123 by greg rutkowski",
    "user@example.com C:\\Users\\me\\file.png",
    "def f(x): return x**2 # comment",
    # literal special tokens
    "<|endoftext|>",
    "<|startoftext|>",
    "a <|endoftext|> b <|startoftext|> c",
    "x<|endoftext|>y",
    "<|ENDOFTEXT|> upper case special",
    "<|endoftext|><|endoftext|><|endoftext|>",
    "<|endof text|> broken special",
    # repeated
    "a" * 300,
    "!" * 100,
    "ha" * 60,
    "lol " * 30,
    # long prompts, several lengths
    ", ".join(["masterpiece", "best quality", "ultra detailed", "8k"] * 10),
    "a highly detailed matte painting of a castle on a cliff at sunset, " * 8,
    "超高精細な風景画、夕日の城、" * 10,
    "🐱" * 90,
    " ".join(f"word{i}" for i in range(100)),
]
# Text-token counts around the cut: 75 fit between start and end tokens, 76 and 77 lose the tail.
BOUNDARY_COUNTS = (74, 75, 76, 77, 78)
PROMPTS += [CAT * n for n in BOUNDARY_COUNTS]
PROMPTS += [CAT * 74 + "cafés", CAT * 75 + "!"]  # a multi-token word across the cut


def _special(content: str) -> dict:
    """A special token as SD 1.x/2.x's tokenizer_config.json (transformers 4) writes it."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def _optimum_folder(source: Path, out: Path, pad: str) -> Path:
    """optimum's layout, configs as the SD 1.5 / 2.1 repositories ship them: no tokenizer.json."""
    out.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / name, out / name)
    config = {
        "add_prefix_space": False, "bos_token": _special("<|startoftext|>"), "do_lower_case": True,
        "eos_token": _special("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": _special("<|endoftext|>"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokens_map = {k: v for k, v in config.items() if k.endswith("_token")}
    tokens_map = {k: {f: x for f, x in v.items() if f != "__type"} if isinstance(v, dict) else v
                  for k, v in tokens_map.items()}
    (out / "special_tokens_map.json").write_text(json.dumps(tokens_map, indent=2))
    return out


@pytest.fixture(scope="module")
def source_tokenizer(tiny_diffusers_dir: Path):
    return transformers.CLIPTokenizer.from_pretrained(tiny_diffusers_dir / "tokenizer")


@pytest.fixture(scope="module")
def folders(source_tokenizer, tiny_diffusers_dir: Path, tmp_path_factory) -> dict[str, Path]:
    from sdport.export.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    save_tokenizer(source_tokenizer, root / "sd1_json")
    sd2 = transformers.CLIPTokenizer.from_pretrained(tiny_diffusers_dir / "tokenizer", pad_token="!")
    save_tokenizer(sd2, root / "sd2_json")
    return {
        "sd1_json": root / "sd1_json",
        "sd2_json": root / "sd2_json",
        "sd1_optimum": _optimum_folder(root / "sd1_json", root / "sd1_optimum", "<|endoftext|>"),
        "sd2_optimum": _optimum_folder(root / "sd1_json", root / "sd2_optimum", "!"),
    }


def _reference(folder: Path, prompts: list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """What diffusers' StableDiffusionPipeline feeds the text encoder."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    return np.asarray(
        tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids
    )


def test_prompt_lengths_straddle_the_cut(source_tokenizer) -> None:
    lengths = [len(ids) - 2 for ids in source_tokenizer([CAT * n for n in BOUNDARY_COUNTS]).input_ids]
    assert lengths == list(BOUNDARY_COUNTS)
    assert len(set(PROMPTS)) >= 60


@pytest.mark.parametrize("layout", ["sd1_json", "sd1_optimum", "sd2_json", "sd2_optimum"])
def test_ids_match_transformers(folders: dict, layout: str) -> None:
    folder = folders[layout]
    if layout.endswith("optimum"):
        assert not (folder / "tokenizer.json").exists()
    ours = ClipTokenizer.load(folder).encode(PROMPTS)
    assert ours.dtype == np.int64 and ours.shape == (len(PROMPTS), MAX_LENGTH)
    np.testing.assert_array_equal(ours, _reference(folder, PROMPTS))


def test_pad_ids(folders: dict) -> None:
    assert ClipTokenizer.load(folders["sd1_json"]).encode([""])[0, 2:].tolist() == [49407] * 75
    for layout in ("sd2_json", "sd2_optimum"):
        ids = ClipTokenizer.load(folders[layout]).encode(["", "hi!"])
        assert ids[0, :3].tolist() == [49406, 49407, 0]
        assert ids[1, 2] == 0  # transformers matches SD 2.x's pad "!" inside text; so do we


def test_saved_vocab_and_merges_reproduce_the_source(folders: dict, source_tokenizer) -> None:
    expected = source_tokenizer(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    np.testing.assert_array_equal(_reference(folders["sd1_optimum"], PROMPTS), expected.input_ids)
    np.testing.assert_array_equal(_reference(folders["sd1_json"], PROMPTS), expected.input_ids)
    assert (folders["sd1_json"] / "merges.txt").read_text().startswith("#version: 0.2\n")
    tokens_map = json.loads((folders["sd2_json"] / "special_tokens_map.json").read_text())
    assert tokens_map["pad_token"] == "!"


def test_max_length_override(folders: dict) -> None:
    ours = ClipTokenizer.load(folders["sd1_optimum"], max_length=20).encode(PROMPTS)
    np.testing.assert_array_equal(ours, _reference(folders["sd1_optimum"], PROMPTS, max_length=20))


def test_truncation_warning_counts_dropped_tokens(
    folders: dict, source_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = ClipTokenizer.load(folders["sd1_json"])
    prompts = [CAT * 75, "short", CAT * 76, PROMPTS[-8], CAT * 75 + "the end of it"]
    with caplog.at_level(logging.WARNING, logger="sdport.runtime.tokenizer"):
        tokenizer.encode(prompts)
    counts = [len(ids) - 2 for ids in source_tokenizer(prompts).input_ids]
    expected = {i: n - 75 for i, n in enumerate(counts) if n > 75}
    assert set(expected) == {2, 3, 4}
    found = {}
    for record in caplog.records:
        match = re.search(r"prompt (\d+) .* dropped the last (\d+) tokens: (.*)$", record.getMessage())
        assert match, record.getMessage()
        found[int(match[1])] = int(match[2])
        assert prompts[int(match[1])].rstrip().endswith(ast.literal_eval(match[3]).rstrip())
    assert found == expected
    assert "'the end of it'" in caplog.records[-1].getMessage()


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def _bad_folders(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Broken tokenizer folders and a phrase the refusal must contain."""
    vocab = {"a": 0, "b": 1, "ab": 2, "[UNK]": 3}
    merges_only = {"merges.txt": "#version: 0.2\n"}
    bad: dict[str, tuple[Path, str]] = {
        "missing folder": (tmp / "nowhere", "tokenizer folder not found"),
        "empty folder": (_write(tmp / "empty", {}), "no tokenizer.json and no vocab.json + merges.txt"),
        "merges without vocab": (_write(tmp / "novocab", merges_only), "no tokenizer.json"),
        "invalid json": (_write(tmp / "badjson", {"tokenizer.json": "{not json"}), "not a readable"),
        "not a tokenizer": (_write(tmp / "nottok", {"tokenizer.json": '{"version": "1.0"}'}), "not a readable"),
        "bad config": (_write(tmp / "badcfg", {"tokenizer_config.json": "[1,"}), "not valid JSON"),
        "bad vocab.json": (_write(tmp / "badvocab", {"vocab.json": "{", **merges_only}), "do not load as a BPE"),
        "token without content": (
            _write(tmp / "nocontent", {"tokenizer_config.json": '{"bos_token": {"x": 1}}'}),
            "neither a string nor an object",
        ),
    }
    for name, model in {
        "wordpiece": models.WordPiece(vocab, unk_token="[UNK]"),
        "unigram": models.Unigram([("a", -1.0), ("b", -2.0), ("[UNK]", -3.0)], 2),
        "gpt2 bpe": models.BPE(vocab, [("a", "b")]),
    }.items():
        (tmp / name).mkdir()
        Tokenizer(model).save(str(tmp / name / "tokenizer.json"))
        bad[name] = (tmp / name, "not CLIP's BPE" if name != "gpt2 bpe" else "end-of-word suffix")
    no_bos = json.loads((good / "tokenizer.json").read_text())
    del no_bos["model"]["vocab"]["<|startoftext|>"]
    no_bos["added_tokens"] = [t for t in no_bos["added_tokens"] if t["content"] != "<|startoftext|>"]
    no_bos["post_processor"] = None
    bad["no bos in vocab"] = (_write(tmp / "nobos", {"tokenizer.json": json.dumps(no_bos)}),
                              "bos_token '<|startoftext|>' is not in the vocabulary")
    bad["unknown pad"] = (shutil.copytree(good, tmp / "badpad"), "pad_token '[PAD]' is not in the vocab")
    (tmp / "badpad" / "special_tokens_map.json").write_text('{"pad_token": "[PAD]"}')
    return bad


def test_bad_folders_are_refused(folders: dict, tmp_path: Path) -> None:
    for case, (folder, phrase) in _bad_folders(folders["sd1_json"], tmp_path).items():
        with pytest.raises(ManifestError) as info:
            ClipTokenizer.load(folder)
        message = str(info.value)
        assert phrase in message and "\n" not in message, (case, message)
        assert str(folder) in message, (case, message)


def test_runtime_tokenizer_imports_no_torch() -> None:
    code = ("import sys, sdport.runtime.tokenizer; "
            "print(sorted({'torch', 'transformers', 'diffusers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
