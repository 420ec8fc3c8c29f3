"""Property-based fuzzing (hypothesis) of what users and strangers hand sdport.

Properties: every request, command line, manifest, safetensors header, ONNX file and tokenizer
config either works or raises SdportError with a one-line message (exit 2 from the CLI), never
another exception; and whatever works gives finite images of the requested size.

Bounded for CI: deterministic (derandomize) and about a minute in all on two cores. Set
SDPORT_FUZZ_SCALE=10 to try ten times as many random (not derandomized) inputs. Run with -s to
see how many inputs each test tried.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import struct
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdport.cli import EXIT_USAGE, main
from sdport.errors import SdportError
from sdport.models.manifest import read_manifest
from sdport.runtime import Pipeline
from sdport.runtime.images import output_paths
from sdport.runtime.request_checks import MAX_IMAGES
from sdport.runtime.schedulers import request_names

SCALE = float(os.environ.get("SDPORT_FUZZ_SCALE", "1"))
TRIED: Counter[str] = Counter()


def fuzz_settings(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=SCALE == 1,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None,
    )


@pytest.fixture(scope="module", autouse=True)
def report_counts(tmp_path_factory):
    # Fuzzed graphs must not land in the user's session cache.
    with mock.patch.dict(os.environ, {"SDPORT_CACHE": str(tmp_path_factory.mktemp("cache"))}):
        yield
    tried = {k: v for k, v in TRIED.items() if " " not in k}
    print(f"\nfuzz inputs tried: {dict(TRIED)}; total {sum(tried.values())}")


def one_line(error: BaseException) -> None:
    assert "\n" not in str(error), str(error)
    assert str(error).strip(), type(error)


# Any unicode, lone surrogates included (what Python makes of undecodable command-line bytes).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=300)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir: Path) -> Pipeline:
    return Pipeline.load(tiny_onnx_dir, provider="cpu")


# --- requests ------------------------------------------------------------------------------------


JUNK = st.none() | st.booleans() | st.floats() | ANY_TEXT | st.integers(-(2**70), 2**70)
MODES = st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F", "YCbCr", "La", "PA"])
# Per parameter: values that work (kept small: a valid 8192-pixel or 1000-step request would run
# for minutes), and anything at all, minus the valid-but-slow values.
VALID = {
    "prompt": ANY_TEXT.filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)),
    "negative_prompt": ANY_TEXT.filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)),
    "steps": st.integers(1, 3),
    "guidance": st.floats(-20, 20),
    "width": st.sampled_from([None, 16, 32, 48]),
    "height": st.sampled_from([None, 16, 32, 48]),
    "seed": st.integers(0, 2**70),
    "scheduler": st.sampled_from(request_names()),
    "num_images": st.integers(1, 2),
    "image": st.none() | st.builds(lambda m, w, h: Image.new(m, (w, h)), MODES, st.integers(1, 48), st.integers(1, 48)),
    "strength": st.floats(0, 1),
}
SLOW = {"steps": (3, 1000), "width": (48, 8192), "height": (48, 8192), "num_images": (2, MAX_IMAGES)}


def cheap(name: str, value) -> bool:
    """False for a valid integer that would be slow (a big image, many steps)."""
    low, high = SLOW.get(name, (0, -1))
    return not (isinstance(value, int) and not isinstance(value, bool) and low < value <= high)


@st.composite
def requests(draw, names=tuple(VALID)):
    """A request that works, with 0 to 3 of its parameters replaced by anything."""
    request = {name: draw(VALID[name]) for name in names}
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        request[name] = draw(JUNK.filter(lambda v, name=name: cheap(name, v)))
    return request


@fuzz_settings(300)
@given(request=requests())
def test_requests(pipe, request):
    TRIED["requests"] += 1
    try:
        out = pipe.generate(**request, output="np", progress=False)
    except SdportError as exc:
        one_line(exc)
        TRIED["requests refused"] += 1
        return
    assert out.shape[0] == request["num_images"] and out.shape[3] == 3 and out.dtype == np.float32
    if request["width"] is not None:
        assert out.shape[2] == request["width"]
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


FLAGS = {"negative_prompt": "--negative", "steps": "--steps", "guidance": "--guidance", "width": "--width",
         "height": "--height", "seed": "--seed", "scheduler": "--scheduler", "num_images": "--num-images",
         "strength": "--strength"}


@fuzz_settings(200)
@given(request=requests(tuple(FLAGS) + ("prompt",)), extra=st.lists(ANY_TEXT, max_size=1))
def test_command_line(pipe, tiny_onnx_dir, tmp_path_factory, request, extra):
    TRIED["command_line"] += 1
    out = tmp_path_factory.mktemp("cli") / "x.png"
    options = [f"{FLAGS[k]}={v}" for k, v in request.items() if k in FLAGS and v is not None]
    argv = ["generate", str(tiny_onnx_dir), str(request["prompt"]), "-q", "-o", str(out), *options, *extra]
    err = io.StringIO()
    # The session load (a second) is the same every time: reuse the loaded pipeline.
    with mock.patch.object(Pipeline, "load", lambda *a, **k: pipe), contextlib.redirect_stderr(err):
        code = main(argv)
    if code == 0:
        assert err.getvalue() == ""
        count = 1 if request["num_images"] is None else int(request["num_images"])  # None: not passed
        assert all(p.is_file() for p in output_paths(out, count))
    else:
        TRIED["command_line refused"] += 1
        assert code == EXIT_USAGE, err.getvalue()
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sdport: error: "), err.getvalue()
        assert list(out.parent.iterdir()) == []


# --- model folders ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tiny_onnx_dir: Path, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_onnx_dir, tmp_path_factory.mktemp("fuzz") / "model"))


def paths_in(data, prefix=()):
    """Every key path of a JSON document (dict keys and list indices)."""
    yield prefix
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield from paths_in(value, (*prefix, key))


@fuzz_settings(150)
@given(data=st.data())
def test_manifest_mutations(folder, tiny_onnx_dir, data):
    TRIED["manifest"] += 1
    manifest = json.loads((tiny_onnx_dir / "sdport.json").read_text())
    targets = [p for p in paths_in(manifest) if p and "parity" not in p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(targets))
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(JSON)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or replaced the path
    (folder / "sdport.json").write_text(json.dumps(manifest))
    try:
        read_manifest(folder)
        Pipeline.load(folder, provider="cpu", low_memory=True)
    except SdportError as exc:
        one_line(exc)
        TRIED["manifest refused"] += 1


@fuzz_settings(150)
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_manifest_bytes(folder, raw):
    TRIED["manifest_bytes"] += 1
    (folder / "sdport.json").write_bytes(raw)
    with pytest.raises(SdportError) as info:
        read_manifest(folder)
    one_line(info.value)


@fuzz_settings(60)
@given(config=st.dictionaries(
    st.sampled_from(["bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "added_tokens_decoder"]),
    JSON, max_size=4,
))
def test_tokenizer_configs(folder, tiny_onnx_dir, config):
    from sdport.runtime.tokenizer import ClipTokenizer

    TRIED["tokenizer_config"] += 1
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        tokenizer = ClipTokenizer.load(folder / "tokenizer")
    except SdportError as exc:
        one_line(exc)
        return
    ids = tokenizer.encode(["a red fox", ""])
    assert ids.shape == (2, tokenizer.max_length) and ids.dtype == np.int64


# --- files from strangers -----------------------------------------------------------------------------


@fuzz_settings(500)
@given(
    raw=st.binary(max_size=300)
    | st.tuples(
        st.dictionaries(ANY_TEXT, JSON | st.fixed_dictionaries({
            "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "Q4"]) | JSON,
            "shape": st.lists(st.integers(-2, 2**40), max_size=3) | JSON,
            "data_offsets": st.lists(st.integers(-2, 2**40), min_size=2, max_size=2) | JSON,
        }), max_size=3),
        st.integers(0, 64),
    ).map(lambda hd: (lambda h: struct.pack("<Q", len(h)) + h + bytes(hd[1]))(json.dumps(hd[0]).encode()))
)
def test_safetensors_headers(tmp_path_factory, raw):
    from sdport.export.loaders import DTYPE_SIZES, read_safetensors_header

    TRIED["safetensors"] += 1
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(raw)
    try:
        tensors = read_safetensors_header(path)
    except SdportError as exc:
        one_line(exc)
        return
    data_size = len(raw) - 8 - int.from_bytes(raw[:8], "little")
    spans = sorted(t.offsets for t in tensors.values())
    assert sum(e - b for b, e in spans) == data_size  # the tensors tile the data exactly
    for t in tensors.values():
        assert t.offsets[1] - t.offsets[0] == math.prod(t.shape) * DTYPE_SIZES[t.dtype]


@fuzz_settings(300)
@given(data=st.data())
def test_onnx_files(folder, tiny_onnx_dir, tmp_path_factory, data):
    from sdport.runtime.graph_files import check_graph_files
    from sdport.runtime.sessions import Graph

    TRIED["onnx_bytes"] += 1
    original = (tiny_onnx_dir / "text_encoder" / "model.onnx").read_bytes()
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and at < len(raw):
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[at : at + data.draw(st.integers(1, 1 << 16))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=40))
    path = folder / "text_encoder" / "fuzzed.onnx"
    path.write_bytes(bytes(raw))
    try:
        checked = check_graph_files(folder, "text_encoder/fuzzed.onnx")
        Graph("text_encoder", checked, "cpu", fused=True)  # onnxruntime's own errors, wrapped
    except SdportError as exc:
        one_line(exc)
        TRIED["onnx_bytes refused"] += 1
