"""Convs as int8 matrix products (sdport.export.int8_convs), in onnxruntime, against its fp32 Conv
and against the same quantized arithmetic done in NumPy."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdport.export import int8_convs

# (in channels, out channels, kernel, stride, pads [top, left, bottom, right], bias, input H x W)
CASES = {
    "3x3": (8, 16, 3, 1, [1, 1, 1, 1], True, (12, 10)),
    "3x3 stride 2 (a UNet's downsampler)": (8, 16, 3, 2, [1, 1, 1, 1], True, (12, 10)),
    "3x3 stride 2, pads after only, odd sizes (the VAE encoder's)": (8, 16, 3, 2, [0, 0, 1, 1], True, (11, 9)),
    "1x1 without bias": (8, 16, 1, 1, [0, 0, 0, 0], False, (7, 5)),
    "4 channels in (conv_in)": (4, 6, 3, 1, [1, 1, 1, 1], True, (4, 4)),
}


def _conv_model(cin: int, cout: int, kernel: int, stride: int, pads: list[int], bias: bool,
                seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((cout, cin, kernel, kernel)) / np.sqrt(cin * kernel * kernel)).astype(np.float32)
    initializers = [numpy_helper.from_array(weight, "weight")]
    inputs = ["x", "weight"]
    if bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "bias"))
        inputs.append("bias")
    conv = helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=[kernel, kernel],
                            strides=[stride, stride], pads=pads)
    graph = helper.make_graph(
        [conv], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, "Ho", "Wo"])], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _dequantized_input(x: np.ndarray) -> np.ndarray:
    """x as ONNX's DynamicQuantizeLinear sees it: uint8 over [min(x, 0), max(x, 0)], back to float."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((high - low) / 255)
    zero = np.clip(np.round(-low / scale), 0, 255)
    return ((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float64)


def _conv_numpy(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pads: list[int]) -> np.ndarray:
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    k = w.shape[2]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    y = np.einsum("nchwij,kcij->nkhw", windows, w)
    return y if b is None else y + b[None, :, None, None]


@pytest.mark.parametrize("case", CASES)
def test_a_conv_as_int8_products_is_the_quantized_conv(case):
    cin, cout, kernel, stride, pads, bias, (height, width) = CASES[case]
    model = _conv_model(cin, cout, kernel, stride, pads, bias)
    fp32 = onnx.ModelProto()
    fp32.CopyFrom(model)

    assert int8_convs.rewrite_convs(model) == ["conv"]
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Conv"] == 0 and ops["MatMulIntegerToFloat"] == 1
    assert "weight" not in {t.name for t in model.graph.initializer}  # replaced, not kept beside
    onnx.checker.check_model(model)

    weights = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    matrix, scales = int8_convs.quantize_weight(weights["weight"])
    assert matrix.dtype == np.int8 and np.abs(matrix).max() == 127
    dequantized = (matrix.astype(np.float64) * scales).reshape(kernel, kernel, cin, cout).transpose(3, 2, 0, 1)
    rng = np.random.default_rng(1)
    for size in ((height, width), (height + 4, width + 2)):  # one graph for every size
        x = rng.standard_normal((2, cin, *size)).astype(np.float32)
        got, want = _run(model, x), _run(fp32, x)
        assert got.shape == want.shape
        # The same arithmetic in NumPy: what the graph computes, to float rounding.
        same = _conv_numpy(_dequantized_input(x), dequantized, weights.get("bias"), stride, pads)
        np.testing.assert_allclose(got, same, rtol=0, atol=1e-5 * np.abs(same).max())
        # And what it costs: 8-bit activations and weights, about 1% of the output's RMS.
        error = np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))
        assert 0 < error < 0.03, error


def test_only_plain_convs_with_constant_weights_are_rewritten():
    model = _conv_model(8, 16, 3, 1, [1, 1, 1, 1], True)
    grouped = helper.make_node("Conv", ["x", "weight"], ["grouped"], name="grouped", group=8,
                               kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    fed = helper.make_node("Conv", ["x", "fed_weight"], ["fed"], name="fed", kernel_shape=[1, 1])
    model.graph.node.extend([grouped, fed])
    model.graph.input.append(helper.make_tensor_value_info("fed_weight", TensorProto.FLOAT, [4, 8, 1, 1]))

    assert int8_convs.rewrite_convs(model) == ["conv"]
    assert [n.name for n in model.graph.node if n.op_type == "Conv"] == ["grouped", "fed"]
    assert "weight" in {t.name for t in model.graph.initializer}  # the grouped conv still reads it
