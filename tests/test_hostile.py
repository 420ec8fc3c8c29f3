"""Hostile and broken inputs, end to end through the CLI: one `sdport: error:` line, exit 2, nothing
left behind, and nothing read or run that should not be.

Cases already covered elsewhere (not repeated here): pickles refused without --allow-pickle and
lying safetensors headers (test_loaders, test_export), external data leaving the folder at the
API level and a text-embedding width that disagrees with the graph (test_sessions), existing
PNGs kept without --overwrite (test_cli_generate, test_images).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdport.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
from sdport.errors import SdportError
from sdport.runtime import Pipeline, schedulers, sessions

onnx = pytest.importorskip("onnx")
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def one_line_error(capsys, code: int, *fragments: str) -> str:
    """Asserts exit 2 and exactly one `sdport: error:` line holding every fragment; returns it."""
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE, err
    assert out == ""  # nothing from onnxruntime or anyone else on stdout either
    assert err.startswith("sdport: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def generate(model: Path, out: Path, *extra: str, prompt: str = "a red fox") -> int:
    return main(["generate", str(model), prompt, "--steps", "2", "-q", "-o", str(out), *extra])


@pytest.fixture()
def model(tiny_onnx_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny exported model, free to break."""
    return Path(shutil.copytree(tiny_onnx_dir, tmp_path / "model"))


def edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "sdport.json").read_text())
    edit(data)
    (folder / "sdport.json").write_text(json.dumps(data))


def no_pngs(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.suffix in (".png", ".tmp")]


# --- untrusted model folders -----------------------------------------------------------------------


def with_external_weight(path: Path, location: str) -> None:
    """Rewrites the graph at `path` so its first initializer lives in external data at `location`."""
    model = onnx.load(str(path))
    tensor = model.graph.initializer[0]
    length = len(tensor.raw_data) or 4
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(path))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_never_opened(model, tmp_path, capsys, monkeypatch, kind):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(1 << 16))
    location = {"dotdot": "../../secret.bin", "absolute": str(secret), "symlink": "weights.bin"}[kind]
    if kind == "symlink":
        (model / "unet" / "weights.bin").symlink_to(secret)
    with_external_weight(model / "unet" / "model.onnx", location)
    opened = []
    real = sessions.ort.InferenceSession
    monkeypatch.setattr(sessions.ort, "InferenceSession", lambda path, **kw: opened.append(path) or real(path, **kw))
    code = generate(model, tmp_path / "x.png", "--provider", "cpu")
    one_line_error(capsys, code, "unet/model.onnx", repr(location), "outside the model folder")
    assert not any("unet" in p for p in opened)  # onnxruntime never saw the graph
    assert no_pngs(tmp_path)


def test_graph_file_symlinked_out_of_the_folder(model, tmp_path, capsys):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(model / "unet" / "model.onnx", outside)
    (model / "unet" / "model.onnx").symlink_to(outside)
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "points outside the model folder")


def test_tokenizer_file_symlinked_out_of_the_folder(model, tmp_path, capsys):
    outside = tmp_path / "tokenizer.json"
    shutil.move(model / "tokenizer" / "tokenizer.json", outside)
    (model / "tokenizer" / "tokenizer.json").symlink_to(outside)
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "'tokenizer/tokenizer.json' points outside")


def test_truncated_graph(model, tmp_path, capsys):
    path = model / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "unet/model.onnx: not a readable ONNX file (truncated?)")


@pytest.mark.parametrize("content", [b"\x0a\x04junk" * 8, b"\x00" * 64, b"\x08\x07\x12\x02ab"])
def test_corrupt_graph_is_wrapped_with_its_file(model, tmp_path, capsys, content):
    # No digest to compare with: the bytes reach onnxruntime, whose own error is wrapped.
    edit_manifest(model, lambda d: d["graphs"]["vae_decoder"].update(sha256={}))
    (model / "vae_decoder" / "model.onnx").write_bytes(content)
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "vae_decoder", "vae_decoder/model.onnx")


def test_sha256_mismatch_names_the_file(model, tmp_path, capsys):
    path = model / "vae_decoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 1  # one bit, inside the weights: onnxruntime would load it without complaint
    path.write_bytes(bytes(data))
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "vae_decoder: vae_decoder/model.onnx has sha256",
                   "corrupt or incomplete")
    assert no_pngs(tmp_path)


def test_sha256_cache_skips_unchanged_files_only(model, tmp_path, monkeypatch):
    from sdport.runtime import checksums

    monkeypatch.setenv("SDPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checksums, "CACHE_MIN_BYTES", 0)
    hashed = []
    real = checksums.file_sha256
    monkeypatch.setattr(checksums, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    Pipeline.load(model, provider="cpu", low_memory=True)
    assert len(hashed) == 4 and checksums.cache_file().is_file()
    hashed.clear()
    Pipeline.load(model, provider="cpu", low_memory=True)
    assert hashed == []  # verified before, untouched since
    # Same size, same mtime, different bytes: the ctime moves, so it is hashed and refused.
    path = model / "unet" / "model.onnx"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    from sdport.models.manifest import ManifestError

    with pytest.raises(ManifestError, match="unet/model.onnx has sha256"):
        Pipeline.load(model, provider="cpu", low_memory=True)
    Pipeline.load(model, provider="cpu", low_memory=True, verify=False)  # the host's own choice


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda m: shutil.rmtree(m / "unet"), "graph file unet/model.onnx not found"),
        (lambda m: edit_manifest(m, lambda d: d["graphs"].pop("unet")), "no unet graph"),
        (lambda m: shutil.rmtree(m / "tokenizer"), "tokenizer folder not found"),
        (lambda m: (m / "sdport.json").write_text('{"format": "sdport",'), "sdport.json: not valid JSON"),
        (lambda m: (m / "sdport.json").write_text("[" * 100_000), "not valid JSON (nested too deeply)"),
        (lambda m: (m / "sdport.json").write_bytes(b"\xff\xfe\x00"), "sdport.json: not valid JSON"),
        (lambda m: edit_manifest(m, lambda d: d["graphs"]["unet"].update(file="unet/nope.onnx")),
         "graph file unet/nope.onnx not found"),
        (lambda m: edit_manifest(m, lambda d: d.update(scheduler_config="scheduler/gone.json")),
         "gone.json: file not found"),
        (lambda m: edit_manifest(m, lambda d: d.update(vae_scale="8")), "vae_scale is '8', wants a power of two"),
        (lambda m: edit_manifest(m, lambda d: d.update(tokenizer_dir="../../etc")), "points outside the model folder"),
        (lambda m: edit_manifest(m, lambda d: d.update(tokenizer_dir="a\x00b")), "not a usable path"),
        (lambda m: edit_manifest(m, lambda d: d["graphs"]["unet"]["sha256"].update({"unet/extra.bin": "ab" * 32})),
         "unet/extra.bin is listed in sdport.json but missing"),
        (lambda m: os.truncate(m / "sdport.json", 65 << 20), "far too large for a config file"),
    ],
    ids=["no-unet-folder", "no-unet-entry", "no-tokenizer", "bad-json", "deep-json", "binary-json",
         "missing-graph-file", "missing-scheduler", "wrong-type", "tokenizer-outside", "nul-path", "missing-listed", "huge"],
)
def test_broken_model_folder(model, tmp_path, capsys, breakage, message):
    breakage(model)
    one_line_error(capsys, generate(model, tmp_path / "x.png"), message)
    assert no_pngs(tmp_path)


def test_optimum_folder_with_broken_model_index(model, tmp_path, capsys):
    (model / "sdport.json").unlink()
    (model / "model_index.json").write_text("{nope")
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "model_index.json: not valid JSON")
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "config.json").write_text(json.dumps({"in_channels": "four"}))
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "latent_channels is 'four'")
    (model / "unet" / "config.json").write_text("{}")
    (model / "unet" / "model.onnx").unlink()
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "no unet graph")


def rename_input(path: Path, old: str, new: str) -> None:
    from sdport.export.subgraphs import rename_references

    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        rename_references(node, {old: new})  # in If branches too (the UNet's guided prefix)
    onnx.save(model, str(path))


def test_graph_with_wrong_input_names_is_refused_at_load(model, tmp_path, capsys, session_runs):
    edit_manifest(model, lambda d: d["graphs"]["unet"].update(sha256={}))
    rename_input(model / "unet" / "model.onnx", "sample", "x")
    code = generate(model, tmp_path / "x.png")
    one_line_error(capsys, code, "unet: unet/model.onnx has no input 'sample' (it has 'x',")
    assert session_runs.runs == []  # refused at load, before any graph ran


def test_manifest_latent_channels_disagree_with_the_graph(model, tmp_path, capsys):
    edit_manifest(model, lambda d: d.update(latent_channels=8))
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "has 4 at axis 1, the manifest says 8")


def test_tokenizer_that_is_not_clip(model, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    (model / "tokenizer" / "tokenizer.json").unlink()
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(model / "tokenizer" / "tokenizer.json"))
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "the tokenizer is a WordLevel model, not CLIP's BPE")
    (model / "tokenizer" / "tokenizer.json").write_text("not json")
    one_line_error(capsys, generate(model, tmp_path / "x.png"), "not a readable tokenizer.json")


# --- bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "0"], "width must be an integer of at least 16"),
        (["--height=-64"], "height must be an integer of at least 16"),
        (["--width", "1000000000"], "width 1000000000 is too large: at most 8192"),
        (["--width", "1e3"], "argument --width: invalid int value: '1e3'"),
        (["--steps=-3"], "steps must be a positive integer"),
        (["--steps", "abc"], "argument --steps: invalid int value"),
        (["--steps", "5000"], "5000 steps exceed num_train_timesteps=1000; use at most 1000"),
        (["--guidance", "nan"], "guidance must be a finite number, got nan"),
        (["--guidance=-inf"], "guidance must be a finite number, got -inf"),
        (["--strength", "1.5"], "strength must be in [0, 1], got 1.5"),
        (["--strength=-0.1"], "strength must be in [0, 1]"),
        (["--strength", "nan"], "strength must be a finite number"),
        (["--seed", "-2"], "seed must be a non-negative integer, got -2"),
        (["--num-images", "0"], "--num-images must be at least 1"),
        (["--provider", "cuda "], "unknown provider 'cuda '; choose auto, cuda, dml, cpu"),
        (["--scheduler", "Euler"], "unknown scheduler 'Euler'; choose one of: ddim,"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_request(tiny_onnx_dir, tmp_path, capsys, args, message):
    one_line_error(capsys, generate(tiny_onnx_dir, tmp_path / "x.png", *args), message)
    assert no_pngs(tmp_path)


def test_missing_arguments_are_one_line(capsys):
    one_line_error(capsys, main([]), "the following arguments are required: command")
    one_line_error(capsys, main(["generate"]), "required: model, prompt", "sdport generate --help")


@pytest.mark.parametrize(
    ("make", "outcome"),
    [
        (lambda p: p.write_text("a text file"), "not an image PIL can read"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20)), "not an image PIL can read"),
        (lambda p: p.mkdir(), "is not a file"),
        (lambda p: Image.new("I;16", (64, 64)).save(p, format="PNG"), "mode I;16 (16-bit) is not supported"),
        (lambda p: Image.new("F", (64, 64)).save(p, format="TIFF"), "mode F (32-bit float) is not supported"),
        (lambda p: Image.new("RGBA", (64, 64), (9, 9, 9, 0)).save(p, format="PNG"), "ok"),
        (lambda p: Image.new("LA", (64, 64)).save(p, format="PNG"), "ok"),
        (lambda p: Image.new("CMYK", (64, 64)).save(p, format="JPEG"), "ok"),
    ],
    ids=["text", "broken-png", "folder", "16-bit", "float", "alpha", "grey-alpha", "cmyk"],
)
def test_input_image(tiny_onnx_dir, tmp_path, capsys, make, outcome):
    source = tmp_path / "in.img"
    make(source)
    out = tmp_path / "out.png"
    code = main(["generate", str(tiny_onnx_dir), "a fox", "--steps", "2", "--image", str(source), "-o", str(out)])
    if outcome == "ok":  # converted, and said so (not with -q)
        assert code == 0
        assert "converted to RGB" in capsys.readouterr().err
        assert out.is_file()
    else:
        one_line_error(capsys, code, outcome)
        assert not out.exists()


def test_decompression_bomb_is_refused(tiny_onnx_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64 x 64 image now counts as a bomb
    source = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(source)
    one_line_error(capsys, generate(tiny_onnx_dir, tmp_path / "x.png", "--image", str(source)), "decompression bomb")


@pytest.mark.parametrize(
    "prompt",
    ["", " ", "🦊" * 400, "a\x00b\x1b[31m", "狐狸 ลูกสุนัขจิ้งจอก Fuchs مرحبا", "<|endoftext|>" * 30, "\u202e\ufeff\u200d"],
)
def test_prompts_of_any_length_and_unicode(tiny_onnx_dir, tmp_path, capsys, prompt):
    out = tmp_path / "x.png"
    assert generate(tiny_onnx_dir, out, "--negative", prompt[::-1], prompt=prompt) == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.text["parameters"].startswith(prompt.replace("\x00", "")[:1])


def test_lone_surrogate_prompt_is_refused(tiny_onnx_dir, tmp_path, capsys):
    # What Python makes of a command-line argument that is not valid UTF-8.
    code = generate(tiny_onnx_dir, tmp_path / "x.png", prompt="caf\udce9")
    one_line_error(capsys, code, "prompt is not valid Unicode (a lone surrogate '\\udce9' at character 3")


# --- faults ----------------------------------------------------------------------------------------


def test_output_path_problems(tiny_onnx_dir, tmp_path, capsys):
    (tmp_path / "taken.png").mkdir()
    code = generate(tiny_onnx_dir, tmp_path / "taken.png", "--overwrite")
    one_line_error(capsys, code, "taken.png is a folder; choose a file name for -o")
    one_line_error(capsys, generate(tiny_onnx_dir, tmp_path / "no" / "x.png"), "output folder", "does not exist")


def test_unwritable_output_folder(tiny_onnx_dir, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if ROOT:  # root passes permission checks: make the folder read-only as a user would see it
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    one_line_error(capsys, generate(tiny_onnx_dir, locked / "x.png"), "is not writable")


def test_write_failure_at_the_end_is_one_line(tiny_onnx_dir, tmp_path, capsys, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    code = generate(tiny_onnx_dir, tmp_path / "x.png")
    one_line_error(capsys, code, f"could not write {tmp_path / 'x.png'}: No space left on device")
    assert list(tmp_path.iterdir()) == []  # the temporary PNG is gone too


def poison(session_runs, component: str, value=np.nan, at_run: int = 1, exception=None) -> None:
    """Makes `component`'s graph return `value` everywhere (or raise) from its `at_run`-th run on."""

    def alter(graph, outputs):
        if graph != component or len(session_runs.of(component)) < at_run:
            return None
        if exception is not None:
            raise exception
        return {name: np.full_like(v, value) for name, v in outputs.items()}

    session_runs.alter = alter


@pytest.mark.parametrize(
    ("component", "value", "message"),
    [
        ("unet", np.nan, "unet: output has NaN or inf at step 2"),
        ("unet", np.inf, "unet: output has NaN or inf at step 2"),
        ("vae_decoder", np.nan, "vae_decoder: image(s) [0, 1] have NaN or inf pixels"),
        ("text_encoder", -np.inf, "text_encoder: output has NaN or inf"),
    ],
)
# The one line is all the user sees: a NumPy warning on the way (printed with its source line
# before the error) fails the test.
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_nan_is_reported_not_written_as_black(tiny_onnx_dir, tmp_path, capsys, session_runs, component, value, message):
    poison(session_runs, component, value, at_run=2 if component == "unet" else 1)
    code = generate(tiny_onnx_dir, tmp_path / "x.png", "--num-images", "2", "--steps", "3")
    one_line_error(capsys, code, message)
    assert no_pngs(tmp_path)


def test_ctrl_c_during_generate(tiny_onnx_dir, tmp_path, capsys, session_runs):
    poison(session_runs, "unet", at_run=2, exception=KeyboardInterrupt())
    assert generate(tiny_onnx_dir, tmp_path / "x.png") == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "sdport: interrupted\n"
    assert list(tmp_path.iterdir()) == []


# --- untrusted checkpoints and export faults ----------------------------------------------------------


def test_export_lying_safetensors_via_cli(tmp_path, capsys):
    raw = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 16]}}).encode()
    source = tmp_path / "lie.safetensors"
    source.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    code = main(["export", str(source), str(tmp_path / "out"), "-q"])
    one_line_error(capsys, code, "lie.safetensors: tensor 'w'", "needs 4398046511104 bytes but its offsets span 16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lie.safetensors"]


def test_export_diffusers_folder_missing_a_component_via_cli(tiny_diffusers_dir, tmp_path, capsys):
    source = Path(shutil.copytree(tiny_diffusers_dir, tmp_path / "sd"))
    shutil.rmtree(source / "tokenizer")
    code = main(["export", str(source), str(tmp_path / "out"), "-q"])
    one_line_error(capsys, code, "the tokenizer component is missing (no tokenizer/ folder)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


def test_export_to_an_unusable_place_fails_before_loading(tiny_diffusers_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = main(["export", str(tiny_diffusers_dir), str(tmp_path / "file" / "out"), "-q"])
    one_line_error(capsys, code, f"{tmp_path / 'file'} is not a writable folder; choose another OUT")


def test_export_full_disk_is_one_line_and_cleans_up(tiny_diffusers_dir, tmp_path, capsys, monkeypatch):
    from sdport.export import folder as export_folder

    def full(path, *_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export_folder, "resave", full)
    code = main(["export", str(tiny_diffusers_dir), str(tmp_path / "out"), "-q"])
    partial = tmp_path / f".out.partial-{os.getpid()}"
    one_line_error(capsys, code, f"export failed writing {partial}/.work/text_encoder/traced/model.onnx: No space left",
                   f"removed the partial folder {partial}", "free some space")
    assert list(tmp_path.iterdir()) == []


def start_export(source: Path, out: Path) -> subprocess.Popen:
    """`sdport export` in a child process; returns once it has started its first graph."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "sdport.cli", "export", str(source), str(out), "--no-optimize"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
        # As a terminal would: a suite started in the background (`cmd &`) inherits SIGINT ignored,
        # and Python then never installs its Ctrl-C handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    for line in child.stderr:
        if line.startswith("[1/4]"):
            return child
        assert time.monotonic() < deadline, "the export did not start"
    raise AssertionError(f"export ended before its first stage (exit {child.wait()})")


def test_export_interrupted_by_ctrl_c_leaves_nothing(tiny_diffusers_dir, tmp_path):
    out = tmp_path / "out"
    child = start_export(tiny_diffusers_dir, out)
    child.send_signal(signal.SIGINT)
    rest = child.stderr.read()
    assert child.wait(timeout=120) == EXIT_INTERRUPTED, rest
    assert "sdport: interrupted" in rest and "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


def test_export_killed_then_rerun_cleans_up_and_works(tiny_diffusers_dir, tmp_path, capsys):
    out = tmp_path / "out"
    child = start_export(tiny_diffusers_dir, out)
    child.kill()  # SIGKILL: no chance to clean up
    child.wait(timeout=60)
    child.stderr.close()
    stale = tmp_path / f".out.partial-{child.pid}"
    assert stale.is_dir() and not out.exists()
    assert main(["export", str(tiny_diffusers_dir), str(out), "--no-optimize"]) == 0
    assert f"removed {stale}, left by an export that was interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "sdport.json").is_file()


def test_live_exports_partial_folder_is_kept(tmp_path):
    from sdport.export.staging import remove_stale_siblings

    live = tmp_path / f".out.partial-{os.getpid()}"  # this process: alive
    live.mkdir()
    dead = tmp_path / ".out.partial-999999999"  # no such pid
    dead.mkdir()
    other = tmp_path / ".other.partial-999999999"  # another OUT's
    other.mkdir()
    assert remove_stale_siblings(tmp_path / "out") == [dead]
    assert live.is_dir() and other.is_dir()


@pytest.mark.parametrize("scheduler", schedulers.available())
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_one_bad_unet_value_is_named_by_every_scheduler(tiny_onnx_dir, session_runs, scheduler, value):
    """The pipeline checks only the latents after each step and names the UNet when its output
    was bad: so every scheduler must carry a single NaN or inf (here in the unconditional half)
    into the latents of the step that evaluated it."""

    def alter(graph, outputs):
        if graph == "unet" and len(session_runs.of("unet")) == 2:
            out = outputs["out_sample"].copy()
            out[0, 1, 2, 3] = value
            return {"out_sample": out}
        return None

    session_runs.alter = alter
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    with pytest.raises(SdportError, match="unet: output has NaN or inf at step 2 "):
        pipe.generate("a fox", steps=3, scheduler=scheduler, seed=0, progress=False)


def test_huge_finite_latents_are_not_called_nan(tiny_onnx_dir, session_runs):
    """The per-step check is x . x, which overflows float32 past |x| ~ 1e19; the full check then
    finds every value finite, and the loop goes on."""
    session_runs.alter = lambda graph, outputs: (
        {"out_sample": np.full_like(outputs["out_sample"], 1e21)} if graph == "unet" else None)
    seen = []
    pipe = Pipeline.load(tiny_onnx_dir, provider="cpu")
    with np.errstate(over="ignore", invalid="ignore"):
        pipe.generate("a fox", steps=3, scheduler="euler", seed=0, progress=False, output="np",
                      callback=lambda step, total, x: seen.append(float(np.abs(x).max())))
    assert len(seen) == 3 and all(np.isfinite(seen)) and max(seen) > 1e19
