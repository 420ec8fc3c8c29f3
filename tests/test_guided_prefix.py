"""The UNet's guided prefix: computed once for the two equal halves of a guided batch, and the
same numbers as diffusers for every batch, guided or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export import TOLERANCE, cli_export_keywords, run_profiled

from sdport.export import guided_prefix
from sdport.export.components import _traceable
from sdport.export.folder import export_model
from sdport.export.quantize import quantize_model


@pytest.fixture(scope="module")
def reference(tiny_diffusers_dir: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir, safety_checker=None)


@pytest.fixture(scope="module")
def unshared_dir(tiny_diffusers_dir: Path, tmp_path_factory) -> Path:
    return export_model(tiny_diffusers_dir, tmp_path_factory.mktemp("unshared") / "onnx", guided_prefix=False,
                        report=None)


def _inputs(batch: int, h: int, w: int, guided: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sample = rng.standard_normal((batch, 4, h, w), dtype=np.float32)
    if guided:
        sample[batch // 2:] = sample[: batch // 2]
    return {"sample": sample, "timestep": np.array(rng.integers(0, 1000), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32)}


def _diffusers(pipe, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        args = (torch.from_numpy(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states"))
        return pipe.unet(*args).sample.numpy()


def _branch_taken(path: Path, inputs: dict[str, np.ndarray], tmp_path: Path) -> tuple[np.ndarray, set[str]]:
    """The graph's output for `inputs`, and which of the If's branches ran."""
    got, names = run_profiled(path, inputs, tmp_path)
    return got, {suffix for suffix in (guided_prefix.THEN, guided_prefix.ELSE) if any(suffix in n for n in names)}


@pytest.mark.parametrize(
    "batch, h, w, guided, branch",
    [
        (2, 8, 8, True, guided_prefix.THEN),    # guidance, one image
        (4, 6, 10, True, guided_prefix.THEN),   # guidance, two images, another size
        (2, 8, 8, False, guided_prefix.ELSE),   # two different latents
        (1, 8, 8, False, guided_prefix.ELSE),   # no guidance
        (3, 12, 8, False, guided_prefix.ELSE),  # an odd batch: no halves
    ],
)
def test_every_batch_matches_diffusers_and_equal_halves_run_the_half_branch(
    batch, h, w, guided, branch, tiny_onnx_dir, reference, tmp_path
):
    inputs = _inputs(batch, h, w, guided, np.random.default_rng(batch * 100 + h))
    got, ran = _branch_taken(tiny_onnx_dir / "unet" / "model.onnx", inputs, tmp_path)
    want = _diffusers(reference, inputs)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())
    assert ran == {branch}


def test_halves_that_differ_by_one_value_or_hold_nan_take_the_full_branch(tiny_onnx_dir, tmp_path):
    path = tiny_onnx_dir / "unet" / "model.onnx"
    inputs = _inputs(2, 8, 8, True, np.random.default_rng(7))
    inputs["sample"][1, 3, 7, 7] = np.nextafter(inputs["sample"][0, 3, 7, 7], np.float32(np.inf))
    assert _branch_taken(path, inputs, tmp_path)[1] == {guided_prefix.ELSE}
    inputs["sample"][:, 0, 0, 0] = np.nan  # NaN == NaN is false: never "equal halves"
    assert _branch_taken(path, inputs, tmp_path)[1] == {guided_prefix.ELSE}


def test_the_halves_check_reduces_no_empty_tensor(tiny_onnx_dir):
    # onnxruntime's CUDA ReduceSum refuses an empty input: a batch of one (no guidance) failed on
    # an H100 when the check compared an empty first half with an empty second half.
    model = onnx.load(str(tiny_onnx_dir / "unet" / "model.onnx"))
    reduced = [n.input[0] for n in model.graph.node if n.op_type == "ReduceSum" and n.name.startswith("/guided_prefix/")]
    assert reduced
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in reduced)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 2, 3, 4):
        inputs = _inputs(batch, 8, 8, batch % 2 == 0, np.random.default_rng(batch))
        for name, value in zip(reduced, session.run(reduced, inputs)):
            assert value.size > 0, (batch, name, value.shape)


def test_the_prefix_is_what_comes_before_the_text(tiny_onnx_dir):
    model = onnx.load(str(tiny_onnx_dir / "unet" / "model.onnx"))
    choose = next(n for n in model.graph.node if n.name == guided_prefix.IF_NAME)
    half = next(a.g for a in choose.attribute if a.name == "then_branch")
    names = " ".join(n.name for n in half.node)
    # conv_in, the first ResNet, the first transformer's self-attention and its cross-attention query
    for part in ("conv_in", "down_blocks.0/resnets.0", "transformer_blocks.0/attn1", "transformer_blocks.0/attn2/to_q"):
        assert part in names
    assert "attn2/to_k" not in names and "down_blocks.0/resnets.1" not in names
    assert not any("encoder_hidden_states" in n.input for n in half.node)


def test_restore_gives_back_the_graph_exported_without_it(tiny_onnx_dir, unshared_dir):
    model = onnx.load(str(tiny_onnx_dir / "unet" / "model.onnx"))
    assert guided_prefix.restore_prefix(model) == ["sample", "timestep"]
    plain = onnx.load(str(unshared_dir / "unet" / "model.onnx"))

    def nodes(m):
        return [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]

    assert sorted(nodes(model)) == sorted(nodes(plain))  # the same nodes (the If's place moved the constants)
    assert not any(p.key == guided_prefix.PREFIX_KEY for p in model.metadata_props)
    assert guided_prefix.restore_prefix(plain) == []


def test_int8_unet_keeps_the_prefix_and_its_meaning(tiny_onnx_dir, tmp_path):
    out = quantize_model(tiny_onnx_dir, tmp_path / "int8", report=None)
    path = out / "unet" / "model.onnx"
    model = onnx.load(str(path))
    assert guided_prefix.restore_prefix(model) == ["sample", "timestep"]
    onnx.save(model, str(tmp_path / "restored.onnx"))
    restored = ort.InferenceSession(str(tmp_path / "restored.onnx"), providers=["CPUExecutionProvider"])
    for batch, guided in ((2, True), (1, False)):
        inputs = _inputs(batch, 8, 8, guided, np.random.default_rng(batch))
        got, ran = _branch_taken(path, inputs, tmp_path)
        assert ran == {guided_prefix.THEN if guided else guided_prefix.ELSE}
        want = restored.run(None, inputs)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_geglu_is_traced_as_two_products_and_only_while_tracing(reference):
    from diffusers.models.activations import GEGLU

    geglu = next(m for m in reference.unet.modules() if isinstance(m, GEGLU))
    x = torch.randn(2, 5, geglu.proj.in_features)
    with torch.no_grad():
        want = geglu(x)
        with _traceable(reference.unet):
            assert "forward" in vars(geglu)
            got = geglu(x)
    assert "forward" not in vars(geglu)  # the model keeps its own forward
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_export_has_no_geglu_slices(tiny_onnx_dir):
    model = onnx.load(str(tiny_onnx_dir / "unet" / "model.onnx"), load_external_data=False)
    ff = [n.op_type for n in model.graph.node if "/ff/" in n.name]
    assert ff and "Slice" not in ff and "Split" not in ff


def _synthetic_unet() -> onnx.ModelProto:
    """A small graph with what the rewrite must handle beyond the tiny UNet: a batched timestep,
    a prefix tensor measured (Shape) but not handed on, a shape handed on, and a scalar input
    that stays outside the prefix."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "weight")
    nodes = [
        helper.make_node("MatMul", ["sample", "weight"], ["h"]),               # [B, 6]
        helper.make_node("Unsqueeze", ["timestep", "one"], ["t"]),             # [B, 1]
        helper.make_node("Add", ["h", "t"], ["ht"]),
        helper.make_node("Mul", ["ht", "scale"], ["hts"]),                      # scale: a scalar input
        helper.make_node("Relu", ["hts"], ["r"]),                               # measured, not handed on
        helper.make_node("Shape", ["r"], ["r_shape"]),
        helper.make_node("Reshape", ["hts", "r_shape"], ["handed"]),
        helper.make_node("Shape", ["handed"], ["handed_shape"]),                # a shape handed on
        helper.make_node("Mul", ["handed", "text"], ["mixed"]),                 # the text enters
        helper.make_node("Reshape", ["mixed", "handed_shape"], ["out"]),
    ]
    for node in nodes:
        node.name = node.output[0]
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 4]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("text", TensorProto.FLOAT, ["B", 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 6])],
        [weight, numpy_helper.from_array(np.array([1], np.int64), "one")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batched_timestep_and_measured_tensors(tmp_path):
    plain = _synthetic_unet()
    shared = onnx.ModelProto()
    shared.CopyFrom(plain)
    assert guided_prefix.share_guided_prefix(shared, ["sample", "timestep", "scale"]) == 8  # all but the last two
    assert guided_prefix.share_guided_prefix(shared, ["sample", "timestep", "scale"]) == 0  # once
    onnx.checker.check_model(shared)
    onnx.save(shared, str(tmp_path / "shared.onnx"))
    want_session = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for batch, equal_sample, equal_time, branch in ((4, True, True, guided_prefix.THEN),
                                                     (4, True, False, guided_prefix.ELSE),
                                                     (2, False, True, guided_prefix.ELSE),
                                                     (1, False, False, guided_prefix.ELSE)):
        sample = rng.standard_normal((batch, 4), dtype=np.float32)
        timestep = rng.uniform(0, 1000, batch).astype(np.float32)
        if equal_sample:
            sample[batch // 2:] = sample[: batch // 2]
        if equal_time:
            timestep[batch // 2:] = timestep[: batch // 2]
        feeds = {"sample": sample, "timestep": timestep, "scale": np.array(0.5, np.float32),
                 "text": rng.standard_normal((batch, 6), dtype=np.float32)}
        got, ran = _branch_taken(tmp_path / "shared.onnx", feeds, tmp_path)
        np.testing.assert_array_equal(got, want_session.run(None, feeds)[0])
        assert ran == {branch}
    assert guided_prefix.restore_prefix(shared) == ["sample", "scale", "timestep"]
    assert [(n.op_type, list(n.input), list(n.output)) for n in shared.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in plain.graph.node]


def test_cli_no_guided_prefix_reaches_the_export(monkeypatch, tmp_path):
    calls = cli_export_keywords(monkeypatch, tmp_path, ["--no-guided-prefix"], [])
    assert [call["guided_prefix"] for call in calls] == [False, True]


def test_fp16_and_unoptimized_exports_leave_the_unet_as_traced(tiny_diffusers_dir, tmp_path):
    for name, kwargs in (("fp16", {"fp16": True}), ("none", {"optimization": "none"})):
        out = export_model(tiny_diffusers_dir, tmp_path / name, report=None, **kwargs)
        model = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
        assert not any(n.op_type == "If" for n in model.graph.node), kwargs
