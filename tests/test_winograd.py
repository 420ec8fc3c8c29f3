"""Winograd F(4x4, 3x3) convolutions: equal to PyTorch's, undone exactly, never folded into 4x weights."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export import CASES, TOLERANCE, cli_export_keywords, torch_outputs

from sdport.export import folder as export_folder
from sdport.export import winograd
from sdport.export.folder import export_model
from sdport.export.quantize import quantize_unet
from sdport.export.subgraphs import attribute_graphs


def _records(path: Path) -> dict:
    return winograd.winograd_records(onnx.load_model(str(path), load_external_data=False))


def _rewrite_all(src: Path, dst: Path, min_tiles: int = winograd.MIN_TILES, strips: int = 1) -> int:
    """`src` with every plain 3x3 conv rewritten (no native-size rule), saved at `dst`."""
    model = onnx.load(str(src))
    convs = [dataclasses.replace(conv, strips=strips) for conv in winograd.eligible_convs(model, None)]
    names = winograd.rewrite_convs(model, convs, min_tiles=min_tiles)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return len(names)


@pytest.fixture(scope="module")
def plain_conv_dir(tiny_diffusers_dir: Path, tmp_path_factory) -> Path:
    # Without the guided prefix too: onnxruntime's quantizer, the reference below, does not look
    # into its If branches.
    return export_model(tiny_diffusers_dir, tmp_path_factory.mktemp("nowino") / "onnx", winograd=False,
                        guided_prefix=False, report=None)


@pytest.fixture(scope="module")
def reference(tiny_diffusers_dir: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir, safety_checker=None)


def test_the_transforms_compute_pytorchs_3x3_convolution_of_a_tile():
    rng = np.random.default_rng(0)
    tile = rng.standard_normal((6, 6)).astype(np.float32)
    kernel = rng.standard_normal((3, 3)).astype(np.float32)
    inputs = winograd.input_kernels().reshape(36, 36) @ tile.reshape(36)
    weights = winograd.weight_rows() @ kernel.reshape(9)
    got = (winograd.output_rows() @ (inputs * weights)).reshape(4, 4)
    want = torch.nn.functional.conv2d(torch.from_numpy(tile)[None, None], torch.from_numpy(kernel)[None, None])
    np.testing.assert_allclose(got, want[0, 0].numpy(), rtol=0, atol=1e-5 * np.abs(want.numpy()).max())


def test_export_rewrites_the_convs_that_pay_at_the_native_size(tiny_onnx_dir: Path, plain_conv_dir: Path):
    # The tiny UNet's native latent is 8x8 (4 tiles of 4x4: too few); its VAE works at 16-64 px.
    assert _records(tiny_onnx_dir / "unet" / "model.onnx") == {}
    decoder = _records(tiny_onnx_dir / "vae_decoder" / "model.onnx")
    assert decoder and all("/decoder/" in name for name in decoder)
    assert _records(tiny_onnx_dir / "vae_encoder" / "model.onnx")
    manifest = json.loads((tiny_onnx_dir / "sdport.json").read_text())
    assert manifest["graphs"]["vae_decoder"]["parity"]["winograd"]["max_rel_error"] < TOLERANCE
    for component in ("unet", "vae_decoder", "vae_encoder"):
        assert _records(plain_conv_dir / component / "model.onnx") == {}


@pytest.mark.parametrize("branch", ["winograd", "direct"])
@pytest.mark.parametrize("component", ["unet", "vae_decoder", "vae_encoder"])
def test_every_conv_rewritten_still_matches_pytorch(component, branch, plain_conv_dir, reference, tmp_path):
    # Every conv through one branch of its If: Winograd from 1 tile up (sizes that are no multiple
    # of the 4x4 tile, 6x10, 3x5 ..., take the padded path), or the direct sum at every size.
    path = tmp_path / component / "model.onnx"
    min_tiles = 1 if branch == "winograd" else 1 << 40
    assert _rewrite_all(plain_conv_dir / component / "model.onnx", path, min_tiles) > 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch, h, w in CASES:
        inputs, wanted = torch_outputs(reference, component, batch, h, w, rng)
        for got, want in zip(session.run(None, inputs), wanted):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())


@pytest.mark.parametrize("component", ["vae_decoder", "vae_encoder"])
def test_convs_transformed_in_strips_still_match_pytorch(component, plain_conv_dir, reference, tmp_path):
    # Large convs (a 512 px VAE's 256-channel ones) are transformed in strips of tile rows. Here
    # every conv in 3, from 1 tile up: even strips, uneven ones (5 tile rows: 1, 2, 2), and
    # inputs with fewer tile rows than strips, which take the direct sum.
    path = tmp_path / component / "model.onnx"
    assert _rewrite_all(plain_conv_dir / component / "model.onnx", path, min_tiles=1, strips=3) > 0
    assert {record["strips"] for record in _records(path).values()} == {3}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    for batch, h, w in CASES + [(1, 5, 7)]:
        inputs, wanted = torch_outputs(reference, component, batch, h, w, rng)
        for got, want in zip(session.run(None, inputs), wanted):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())
    _assert_restores_exactly(path, plain_conv_dir / component / "model.onnx")


@pytest.mark.parametrize("height", [6, 20])  # 2 tile rows (< 3 strips: the direct sum), 5 rows
def test_strips_in_a_graph_with_static_shapes(height):
    # Hosts may fix a graph's input shapes; onnxruntime then infers shapes through every strip,
    # even ones with no tile rows that never run. The reference: onnxruntime's own Conv.
    rng = np.random.default_rng(5)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((24, 16, 3, 3)).astype(np.float32), "weight")
    conv = onnx.helper.make_node("Conv", ["x", "weight"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = onnx.helper.make_graph(
        [conv], "one_conv", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16, height, 40])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    plain = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(plain)
    convs = [dataclasses.replace(c, strips=3) for c in winograd.eligible_convs(rewritten, None)]
    assert winograd.rewrite_convs(rewritten, convs, min_tiles=1) == ["conv"]
    x = rng.standard_normal((2, 16, height, 40)).astype(np.float32)
    want, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                 for m in (plain, rewritten))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * np.abs(want).max())


def test_strips_follow_the_transformed_size_at_the_native_size():
    # 4 bytes x 36 positions per tile and channel; strips are whole tile rows, at most one each.
    whole = winograd.MAX_STRIP_BYTES // (4 * 36)
    assert winograd._strips([1, 8, 8, 8]) == 0  # 4 tiles: too few
    assert winograd._strips([1, 320, 64, 64]) == 1
    assert winograd._strips([1, 256, 512, 512]) == math.ceil(256 * 128 * 128 / whole) == 5
    assert winograd._strips([1, 128, 512, 512]) == 3
    assert winograd._strips([1, 1 << 16, 16, 512]) == 4  # no more strips than tile rows


def test_the_winograd_branch_copies_no_padded_input_and_crops_only_past_the_edge(tiny_onnx_dir: Path,
                                                                                 plain_conv_dir: Path, tmp_path):
    # onnxruntime's Pad and Slice run on one thread (12 and 7 ms per 134 MB): the input
    # transform's Conv pads instead, also in strips, and the output is cropped only where the
    # tiles pass the edge (the results of both, against PyTorch's: the tests above).
    strips = tmp_path / "strips.onnx"
    _rewrite_all(plain_conv_dir / "vae_decoder" / "model.onnx", strips, min_tiles=1, strips=3)
    for path in (tiny_onnx_dir / "vae_decoder" / "model.onnx", strips):
        model = onnx.load(str(path))
        branches = [g for node in model.graph.node if node.op_type == "If" and "/winograd/" in node.name
                    for g in attribute_graphs(node) if g.name.endswith("/winograd/winograd")]
        assert len(branches) == len(_records(path)) > 0
        for branch in branches:
            assert "Pad" not in {node.op_type for node in branch.node}
            transforms = [node for node in branch.node if node.op_type == "Conv"]
            assert transforms and all(
                any(a.name == "pads" and max(a.ints) == winograd.TILE for a in node.attribute) for node in transforms
            )
            crop = next(node for node in branch.node if node.output[0] == branch.output[0].name)
            exact, cropped = (next(a.g for a in crop.attribute if a.name == name)
                              for name in ("then_branch", "else_branch"))
            # Each branch makes the covered output itself (an If copies a branch output made outside).
            assembled = [n.op_type for n in exact.node]
            assert crop.op_type == "If" and assembled in (["DepthToSpace"], ["Concat"])
            assert [n.op_type for n in cropped.node] == assembled + ["Slice"]


def _assert_restores_exactly(rewritten_path: Path, plain_path: Path) -> None:
    rewritten = onnx.load(str(rewritten_path))
    assert winograd.restore_convs(rewritten) == len(_records(rewritten_path)) > 0
    _assert_same_graph(rewritten, plain_path)


def _assert_same_graph(model: onnx.ModelProto, path: Path) -> None:
    other = onnx.load(str(path))
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in other.graph.node
    ]
    want = {t.name: onnx.numpy_helper.to_array(t) for t in other.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def test_restore_gives_back_the_exact_conv_graph(tiny_onnx_dir: Path, plain_conv_dir: Path):
    component = Path("vae_decoder") / "model.onnx"
    _assert_restores_exactly(tiny_onnx_dir / component, plain_conv_dir / component)


@pytest.mark.parametrize("branch", ["winograd", "direct"])
def test_weights_stored_in_several_channel_slices(branch, plain_conv_dir, reference, tmp_path, monkeypatch):
    # The tiny UNet's convs fit one slice; with a small bound they take several of uneven sizes
    # (an SD 1.5 UNet's 1280-channel convs take 4-8), through both branches and back.
    monkeypatch.setattr(winograd, "MAX_U_BYTES", 40_000)
    plain = plain_conv_dir / "unet" / "model.onnx"
    path = tmp_path / "unet" / "model.onnx"
    assert _rewrite_all(plain, path, 1 if branch == "winograd" else 1 << 40) > 0
    records = _records(path).values()
    sizes = [{size for _, size in winograd.channel_slices(r["out_channels"], r["in_channels"])} for r in records]
    assert min(len(r["taps"]) for r in records) >= 3 and any(len(s) > 1 for s in sizes)  # a shorter last slice
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for batch, h, w in CASES:
        inputs, wanted = torch_outputs(reference, "unet", batch, h, w, rng)
        got = session.run(None, inputs)[0]
        np.testing.assert_allclose(got, wanted[0], rtol=0, atol=TOLERANCE * np.abs(wanted[0]).max())
    _assert_restores_exactly(path, plain)
    _assert_not_folded(path, tmp_path)


def test_onnxruntime_does_not_fold_the_weight_transform_into_stored_weights(tiny_onnx_dir, tmp_path):
    # Folded, U = G.g.G^T would be stored: 4x the conv weights (6.8 GB on an SD 1.5 UNet).
    _assert_not_folded(tiny_onnx_dir / "vae_decoder" / "model.onnx", tmp_path)


def _assert_not_folded(src: Path, tmp_path: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    stored_names = {t.name for t in optimized.graph.initializer}
    taps = [name for record in _records(src).values() for name in record["taps"]]
    assert taps and set(taps) <= stored_names  # the 3x3 weights ([9, K*C]), transformed per run
    # In the If branches (the convs', the guided prefix's) onnxruntime may fold shape constants
    # of a few elements, never a weight.
    branches = [g for node in optimized.graph.node for g in attribute_graphs(node)]
    while branches:
        branch = branches.pop()
        for t in branch.initializer:
            assert np.prod(t.dims) <= 16, f"{branch.name}: onnxruntime stored {t.name} {list(t.dims)} in a branch"
        branches += [g for node in branch.node for g in attribute_graphs(node)]
    # A folded U would add 4x the conv weights, a folded direct-branch copy 1x; small shape
    # constants onnxruntime folds add a few elements.
    stored = sum(int(np.prod(t.dims)) for t in optimized.graph.initializer)
    assert stored < 1.01 * sum(int(np.prod(t.dims)) for t in onnx.load(str(src)).graph.initializer)


def test_int8_quantization_of_a_winograd_unet_makes_every_conv_an_int8_product(plain_conv_dir, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    plain = plain_conv_dir / "unet" / "model.onnx"
    rewritten = tmp_path / "rewritten" / "model.onnx"
    assert _rewrite_all(plain, rewritten, strips=2) > 0
    quantized = tmp_path / "int8" / "model.onnx"
    quantize_unet(rewritten, quantized)
    int8 = onnx.load(str(quantized))
    # No Winograd conv is left, nor its fp32 taps: every conv is an int8 product (int8_convs.py).
    assert winograd.winograd_records(int8) == {}
    taps = {name for record in _records(rewritten).values() for name in record["taps"]}
    assert not taps & {t.name for t in int8.graph.initializer}
    op_types = collections.Counter(n.op_type for n in int8.graph.node)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(plain)).graph.node)
    assert op_types["Conv"] == op_types["ConvInteger"] == 0
    assert op_types["MatMulIntegerToFloat"] >= convs and op_types["MatMulInteger"] + op_types["DynamicQuantizeMatMul"] > 0

    # Reference: onnxruntime's own quantizer on the plain graph (its convs as ConvInteger).
    source = onnx.load(str(plain))  # with the domain of its fused attention, for shape inference
    source.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(source, str(tmp_path / "source.onnx"))
    float_type = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_dynamic(tmp_path / "source.onnx", tmp_path / "matmul.onnx", op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True, **float_type})
    quantize_dynamic(tmp_path / "matmul.onnx", tmp_path / "reference.onnx", op_types_to_quantize=["Conv"],
                     weight_type=QuantType.QUInt8, extra_options=float_type)

    # Its output is about as close to the fp32 graph's as the reference's.
    rng = np.random.default_rng(2)
    feeds = {
        "sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32),
        "timestep": np.array(500, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    fp32, got, want = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for path in (rewritten, quantized, tmp_path / "reference.onnx")
    )
    print(f"int8 vs fp32, max abs: sdport {np.abs(got - fp32).max():.3g}, onnxruntime's quantizer "
          f"{np.abs(want - fp32).max():.3g}")
    assert 0 < np.abs(got - fp32).max() < 1.5 * np.abs(want - fp32).max()
    shutil.rmtree(tmp_path / "rewritten")


def test_the_stage_runs_in_a_child_process_for_large_graphs(tiny_diffusers_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_folder.optimize, "SUBPROCESS_MIN_BYTES", 0)  # as for an SD 1.5 UNet
    in_subprocess, stages = export_folder.optimize.in_subprocess, []
    monkeypatch.setattr(export_folder.optimize, "in_subprocess",
                        lambda stage, *args: stages.append(stage.__name__) or in_subprocess(stage, *args))
    out = export_model(tiny_diffusers_dir, tmp_path / "onnx", report=None)
    assert stages.count("winograd") == 2  # the VAE's graphs; the tiny UNet's 8x8 latent is too small
    assert _records(out / "vae_decoder" / "model.onnx")


def test_cli_no_winograd_reaches_the_export(monkeypatch, tmp_path):
    calls = cli_export_keywords(monkeypatch, tmp_path, ["--no-winograd"], [])
    assert [call["winograd"] for call in calls] == [False, True]
