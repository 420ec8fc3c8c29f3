"""Export: ONNX graphs equal PyTorch, the manifest describes them, bad sources are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdport.cli import main
from sdport.errors import SdportError
from sdport.export import folder as export_folder
from sdport.export.folder import export_model
from sdport.export.validate import ParityError
from sdport.models.manifest import COMPONENTS, read_manifest

# Relative to the output's range; traced graphs agree with PyTorch to ~1e-6 here.
TOLERANCE = 1e-4
# Latent sizes other than the ones export validates at (8x8, 8x12), batches 1 and 2.
CASES = [(1, 6, 10), (2, 6, 10), (1, 12, 8), (2, 12, 8)]


@pytest.fixture(scope="module")
def reference(tiny_diffusers_dir: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir, safety_checker=None)


@pytest.fixture(scope="module")
def portable_dir(tiny_diffusers_dir: Path, tmp_path_factory) -> Path:
    return export_model(tiny_diffusers_dir, tmp_path_factory.mktemp("portable") / "onnx",
                        optimization="portable", report=None)


@pytest.fixture(scope="module")
def plain_dir(tiny_diffusers_dir: Path, tmp_path_factory) -> Path:
    return export_model(tiny_diffusers_dir, tmp_path_factory.mktemp("plain") / "onnx",
                        optimization="none", report=None)


def run_profiled(path: Path, inputs: dict[str, np.ndarray], tmp_path: Path) -> tuple[np.ndarray, list[str]]:
    """The graph's first output for `inputs`, and the names of the nodes that ran (onnxruntime's
    profile): which branch of an If ran."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, inputs)[0]
    events = json.loads(Path(session.end_profiling()).read_text())
    return got, [e["name"] for e in events if e.get("cat") == "Node"]


def cli_export_keywords(monkeypatch, tmp_path: Path, *flag_sets: list[str]) -> list[dict]:
    """The keyword arguments export_model gets from `sdport export` with each set of flags."""
    calls = []
    monkeypatch.setattr(export_folder, "export_model", lambda *args, **kwargs: calls.append(kwargs))
    for flags in flag_sets:
        assert main(["export", str(tmp_path / "src"), str(tmp_path / "out"), *flags, "-q"]) == 0
    return calls


def torch_outputs(pipe, component: str, batch: int, h: int, w: int, rng: np.random.Generator):
    """Inputs for `component` and PyTorch's outputs for them, calling diffusers/transformers directly."""
    if component == "text_encoder":
        ids = rng.integers(0, 49408, size=(batch, 77), dtype=np.int64)
        with torch.no_grad():
            out = pipe.text_encoder(torch.from_numpy(ids))
        return {"input_ids": ids}, [out.last_hidden_state.numpy(), out.pooler_output.numpy()]
    if component == "unet":
        sample = rng.standard_normal((batch, 4, h, w), dtype=np.float32)
        timestep = np.array(rng.integers(0, 1000), dtype=np.float32)
        context = rng.standard_normal((batch, 77, 32), dtype=np.float32)
        with torch.no_grad():
            out = pipe.unet(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context))
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
        return inputs, [out.sample.numpy()]
    if component == "vae_decoder":
        latents = rng.standard_normal((batch, 4, h, w), dtype=np.float32)
        with torch.no_grad():
            out = pipe.vae.decode(torch.from_numpy(latents))
        return {"latent_sample": latents}, [out.sample.numpy()]
    image = rng.uniform(-1, 1, size=(batch, 3, 8 * h, 8 * w)).astype(np.float32)
    with torch.no_grad():
        out = pipe.vae.encode(torch.from_numpy(image))
    return {"sample": image}, [out.latent_dist.parameters.numpy()]


@pytest.mark.parametrize("variant", ["ort", "portable", "none"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_graph_matches_pytorch(variant, component, reference, tiny_onnx_dir, portable_dir, plain_dir):
    model_dir = {"ort": tiny_onnx_dir, "portable": portable_dir, "none": plain_dir}[variant]
    session = ort.InferenceSession(str(model_dir / component / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, h, w in CASES:
        inputs, wanted = torch_outputs(reference, component, batch, h, w, rng)
        got = session.run(None, inputs)
        for g, want in zip(got, wanted):
            assert g.shape == want.shape
            scale = np.abs(want).max()
            np.testing.assert_allclose(g, want, rtol=0, atol=TOLERANCE * scale)


def test_portable_graphs_use_standard_operators_only(portable_dir, tiny_onnx_dir):
    for component in COMPONENTS:
        portable = onnx.load(str(portable_dir / component / "model.onnx"))
        assert {n.domain for n in portable.graph.node} <= {"", "ai.onnx"}
    fused = onnx.load(str(tiny_onnx_dir / "unet" / "model.onnx"))
    assert "MultiHeadAttention" in {n.op_type for n in fused.graph.node if n.domain == "com.microsoft"}


def test_manifest_agrees_with_graphs(tiny_onnx_dir: Path, tiny_diffusers_dir: Path):
    manifest = read_manifest(tiny_onnx_dir)
    unet_config = json.loads((tiny_diffusers_dir / "unet" / "config.json").read_text())
    assert manifest.family == "custom"  # a 32-wide text encoder is neither SD 1.x nor 2.x
    assert manifest.prediction_type == "epsilon"
    assert manifest.latent_channels == unet_config["in_channels"]
    assert manifest.latent_multiple == 2 and manifest.vae_scale == 8
    assert manifest.text_embed_dim == 32 and manifest.max_tokens == 77
    assert set(manifest.graphs) == set(COMPONENTS)
    assert manifest.tools["torch"] == torch.__version__
    for name, spec in manifest.graphs.items():
        path = tiny_onnx_dir / spec.file
        for file, digest in spec.sha256.items():
            assert hashlib.sha256((tiny_onnx_dir / file).read_bytes()).hexdigest() == digest
        model = onnx.load(str(path))
        assert spec.opset == max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        for declared, actual in ((spec.inputs, model.graph.input), (spec.outputs, model.graph.output)):
            assert [t.name for t in declared] == [t.name for t in actual]
            for want, got in zip(declared, actual):
                dims = [d.dim_param or d.dim_value for d in got.type.tensor_type.shape.dim]
                assert tuple(dims) == tuple(want.shape), (name, want.name)
                assert onnx.helper.tensor_dtype_to_np_dtype(got.type.tensor_type.elem_type).name == want.dtype
        assert spec.precision == "fp32" and spec.optimization == "ort"
        assert spec.parity["traced"]["max_rel_error"] < TOLERANCE
        assert spec.parity["fused"]["max_rel_error"] < TOLERANCE
        assert len(spec.parity["fused"]["cases"]) >= 4  # two sizes x batches 1 and 2
    for file in ("tokenizer/tokenizer.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json", "model_index.json", "unet/config.json",
                 "vae_decoder/config.json", "vae_encoder/config.json", "text_encoder/config.json"):
        assert (tiny_onnx_dir / file).is_file(), file


def test_fp16_export_with_fp32_vae(tiny_diffusers_dir: Path, tmp_path: Path, monkeypatch):
    # Every optimizer stage in a child process, as for an SD 1.5 UNet (over 1 GiB).
    monkeypatch.setattr(export_folder.optimize, "SUBPROCESS_MIN_BYTES", 0)
    in_subprocess, stages = export_folder.optimize.in_subprocess, []
    monkeypatch.setattr(export_folder.optimize, "in_subprocess",
                        lambda stage, *args: stages.append(stage.__name__) or in_subprocess(stage, *args))
    out = export_model(tiny_diffusers_dir, tmp_path / "fp16", fp16=True, fp32_vae=True, report=None)
    assert stages.count("fuse_for_onnxruntime") == 4 and stages.count("to_fp16") == 2
    assert "winograd" not in stages  # a CPU speed-up; this folder is for GPUs
    manifest = read_manifest(out)
    precisions = {name: spec.precision for name, spec in manifest.graphs.items()}
    assert precisions == {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    weight_types = {t.data_type for t in unet.graph.initializer if len(t.dims) > 1}
    assert weight_types == {onnx.TensorProto.FLOAT16}
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    # A GPU folder keeps the residual Add + LayerNormalization fused (CPU ones don't: test_sessions).
    assert "SkipLayerNormalization" in {node.op_type for node in unet.graph.node}
    assert manifest.graphs["unet"].parity["fp16"]["max_rel_error"] < export_folder.FP16_TOLERANCE


def test_fp16_vae_export_matches_the_fp32_vae(tiny_diffusers_dir: Path, tiny_onnx_dir: Path, tmp_path: Path):
    """--fp16: both VAE graphs in fp16 with fp32 I/O, within the fp16 tolerance of the fp32 export's
    VAE graphs (same weights) on the same inputs, and the pipeline decodes with them."""
    from sdport.runtime import Pipeline

    out = export_model(tiny_diffusers_dir, tmp_path / "fp16", fp16=True, report=None)
    manifest = read_manifest(out)
    assert {name: spec.precision for name, spec in manifest.graphs.items()} == dict.fromkeys(COMPONENTS, "fp16")
    rng = np.random.default_rng(3)
    feeds = {"vae_decoder": {"latent_sample": rng.standard_normal((2, 4, 8, 10)).astype(np.float32)},
             "vae_encoder": {"sample": rng.uniform(-1, 1, (2, 3, 64, 80)).astype(np.float32)}}
    for name, inputs in feeds.items():
        assert manifest.graphs[name].parity["fp16"]["max_rel_error"] < export_folder.FP16_TOLERANCE
        model = onnx.load(str(out / name / "model.onnx"))
        assert {t.data_type for t in model.graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT16}
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
        half = ort.InferenceSession(str(out / name / "model.onnx"), providers=["CPUExecutionProvider"])
        full = ort.InferenceSession(str(tiny_onnx_dir / name / "model.onnx"), providers=["CPUExecutionProvider"])
        got, want = half.run(None, inputs)[0], full.run(None, inputs)[0]
        assert got.dtype == np.float32
        assert np.abs(got - want).max() / np.abs(want).max() < export_folder.FP16_TOLERANCE
    pixels = Pipeline.load(out, provider="cpu").generate("a red fox", steps=2, output="np", progress=False)
    reference = Pipeline.load(tiny_onnx_dir, provider="cpu").generate("a red fox", steps=2, output="np", progress=False)
    assert np.abs(pixels - reference).max() < 0.02  # fp16 text encoder, UNet and VAE against fp32
    # Latents far outside the usual range overflow fp16's 65504 inside the decoder: an error that
    # names the way out, not NaN pixels.
    with pytest.raises(SdportError, match=r"VAE is fp16 and overflowed: re-export with --fp16 --fp32-vae"):
        Pipeline.load(out, provider="cpu")._decode(np.full((1, 4, 8, 8), 3e4, np.float32))
    assert main(["export", str(tiny_diffusers_dir), str(tmp_path / "x"), "-q", "--fp32-vae"]) == 2
    assert not (tmp_path / "x").exists()


def test_single_file_source_gives_the_same_graphs(tiny_diffusers_dir, tiny_onnx_dir, reference, tmp_path):
    from sdport.export.ldm_layout import write_single_file

    checkpoint = tmp_path / "tiny.safetensors"
    write_single_file(reference, checkpoint)
    out = export_model(checkpoint, tmp_path / "onnx", config=tiny_diffusers_dir, report=None)
    rng = np.random.default_rng(1)
    for component in COMPONENTS:
        a = ort.InferenceSession(str(out / component / "model.onnx"), providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(tiny_onnx_dir / component / "model.onnx"), providers=["CPUExecutionProvider"])
        inputs, _ = torch_outputs(reference, component, 2, 6, 10, rng)
        for x, y in zip(a.run(None, inputs), b.run(None, inputs)):
            np.testing.assert_array_equal(x, y)
    assert read_manifest(out).source == str(checkpoint)


def test_pickled_checkpoint_is_refused(tmp_path: Path, capsys):
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(SdportError, match="pickle"):
        export_model(checkpoint, tmp_path / "out", report=None)
    assert main(["export", str(checkpoint), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdport: error:") and "--allow-pickle" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_without_force(tiny_diffusers_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_diffusers_dir), str(out), "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(tiny_diffusers_dir), str(out), "-q", "--force", "--no-optimize"]) == 0
    assert capsys.readouterr().err == ""  # --quiet
    assert not (out / "keep.txt").exists() and (out / "sdport.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary folders left


def test_failed_export_leaves_no_partial_folder(tiny_diffusers_dir: Path, tmp_path: Path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way

    monkeypatch.setattr(export_folder.optimize, "fuse_for_onnxruntime", broken)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_diffusers_dir, tmp_path / "out", report=None)
    assert list(tmp_path.iterdir()) == []


def test_graph_over_tolerance_is_not_written(tiny_diffusers_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(export_folder, "FP32_TOLERANCE", 1e-12)
    with pytest.raises(ParityError, match=r"text_encoder \(traced\): max error .* exceeds"):
        export_model(tiny_diffusers_dir, tmp_path / "out", report=None)
    assert list(tmp_path.iterdir()) == []


def test_cli_tiny_quiet_prints_nothing(tmp_path: Path, capsys):
    """--quiet: not even transformers' "Writing model shards" bar as the weights are saved."""
    assert main(["tiny", str(tmp_path / "sd"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "sd" / "model_index.json").is_file()


def test_cli_tiny_then_export_shows_progress(tmp_path: Path, capsys):
    assert main(["tiny", str(tmp_path / "sd")]) == 0
    assert main(["export", str(tmp_path / "sd"), str(tmp_path / "onnx"), "--no-optimize"]) == 0
    err = capsys.readouterr().err
    assert "[1/4] text_encoder" in err and "[4/4] vae_encoder" in err and "max error" in err


def test_optimizer_crash_is_one_error_naming_the_stage(tiny_diffusers_dir: Path, tmp_path: Path, monkeypatch):
    def crash(*_args, **_kwargs):
        raise ValueError("Failed to serialize proto\nmore detail")

    monkeypatch.setattr(export_folder.optimize, "fuse_for_onnxruntime", crash)
    with pytest.raises(SdportError, match=r"^text_encoder \(fused\): ValueError: Failed to serialize proto; try"):
        export_model(tiny_diffusers_dir, tmp_path / "out", report=None)
    assert list(tmp_path.iterdir()) == []


def test_optimizer_child_process_failure_is_one_line(tmp_path: Path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(RuntimeError) as failure:
        export_folder.optimize.in_subprocess(export_folder.optimize.to_fp16, bad, tmp_path / "fp16.onnx")
    message = str(failure.value)
    assert "\n" not in message and "Traceback" not in message and "Error" in message, message
