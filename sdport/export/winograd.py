"""3x3 convolutions as Winograd F(4x4, 3x3): 2.25 multiplications per output instead of 9.

onnxruntime's CPU Conv is an im2col GEMM that already runs near this CPU's best fp32 rate
(benchmarks/profile_unet.py), so fewer multiplications is what is left. Each eligible Conv
becomes standard ONNX operators (any runtime can run it):

    input tiles:  Pad, then a 6x6 stride-4 Conv with the fixed B^T.d.B kernels -> 36 planes
    products:     one batched MatMul per 6x6 tile position, U[36, K, C] @ V[36, C, tiles]
    output tiles: MatMul with the fixed A^T.m.A rows, then Transpose/Reshape back to NCHW

The weight transform U = G.g.G^T is computed in the graph at every run, not stored: stored,
it would be 4x the conv weights (6.8 GB on an SD 1.5 UNet). It costs a pass over the weights,
which is why convolutions with few tiles (the 8x8 level of a 512 px UNet) stay plain Conv.
Measured on 2 cores (2026-11-26): 1.8-2.4x faster than onnxruntime's Conv at 16x16 to 64x64,
0.6x at 8x8; error 1e-5 of the output range per conv.

`restore_convs` undoes it (int8 quantization wants Conv nodes); the rewritten convs are listed
in the graph's metadata under WINOGRAD_KEY.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

WINOGRAD_KEY = "sdport.winograd"
TILE = 4  # output tile side; input tiles are TILE + 2 = 6
# A conv is rewritten when its input at the folder's native size has at least this many tiles
# (16x16 pixels) and its transformed input (2.25x the input) stays under this many bytes at
# batch 1: the transform is memory traffic, and a 512 px VAE's 256-channel convs would add
# ~1 GB of transient memory for a ~1.1x gain.
MIN_TILES = 16
MAX_TRANSFORMED_BYTES = 128 << 20
MIN_CHANNELS = 16  # conv_in / conv_out (4 channels) gain nothing
# U is made and used in slices of output channels of at most this size: whole, the 2560->1280
# convs of an SD 1.5 UNet would need 472 MB at once, and the CPU arena keeps such peaks (+1.3 GB
# measured).
MAX_U_BYTES = 64 << 20

# Lavin & Gray's F(4x4, 3x3) matrices (interpolation points 0, +-1, +-2, infinity).
_BT = np.array([
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
], dtype=np.float64)
_G = np.array([
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=np.float64)
_AT = np.array([
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
], dtype=np.float64)
POSITIONS = (TILE + 2) ** 2  # 36


def input_kernels() -> np.ndarray:
    """[36, 1, 6, 6]: Conv kernels whose outputs are the tile's B^T.d.B entries."""
    return np.einsum("ia,jb->ijab", _BT, _BT).reshape(POSITIONS, 1, TILE + 2, TILE + 2).astype(np.float32)


def weight_rows() -> np.ndarray:
    """[36, 9]: G.g.G^T for a 3x3 kernel g flattened row-major."""
    return np.einsum("ip,jq->ijpq", _G, _G).reshape(POSITIONS, 9).astype(np.float32)


def output_rows() -> np.ndarray:
    """[16, 36]: the 4x4 output tile (row-major) from the 36 products, A^T.m.A."""
    return np.einsum("ri,sj->rsij", _AT, _AT).reshape(TILE * TILE, POSITIONS).astype(np.float32)


@dataclass(frozen=True)
class _Conv:
    node: onnx.NodeProto
    weight: onnx.TensorProto


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plain_3x3(node: onnx.NodeProto) -> bool:
    """Stride 1, dilation 1, one group, padding 1 on every side: what the rewrite computes."""
    a = _attributes(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    return (
        list(a.get("kernel_shape", [3, 3])) == [3, 3]
        and list(a.get("strides", [1, 1])) == [1, 1]
        and list(a.get("dilations", [1, 1])) == [1, 1]
        and a.get("group", 1) == 1
        and list(a.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
        and auto_pad in (b"NOTSET", "NOTSET")
    )


def conv_input_shapes(model: onnx.ModelProto, folder: Path, input_dims: dict[str, list[int]]) -> dict[str, list]:
    """Each Conv's input shape when the graph's inputs have `input_dims` (onnxruntime's symbolic
    shape inference: it knows the contrib operators that onnx's does not)."""
    import contextlib
    import os

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.input:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, input_dims[value.name]):
            dim.Clear()
            dim.dim_value = size
    # It reads a few small initializers' values (Reshape targets) by their relative file names.
    with contextlib.chdir(folder), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        inferred = SymbolicShapeInference.infer_shapes(probe, auto_merge=True)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in inferred.graph.value_info
    }
    return {n.name: shapes.get(n.input[0]) for n in inferred.graph.node if n.op_type == "Conv"}


def _worth_it(shape: list | None) -> bool:
    if not shape or len(shape) != 4 or any(d is None for d in shape[1:]):
        return False
    _batch, channels, height, width = shape
    tiles = math.ceil(height / TILE) * math.ceil(width / TILE)
    return tiles >= MIN_TILES and channels * POSITIONS * tiles * 4 <= MAX_TRANSFORMED_BYTES


def eligible_convs(model: onnx.ModelProto, shapes: dict[str, list] | None) -> list[_Conv]:
    """Plain fp32 3x3 convs with constant weights; with `shapes`, only those where it pays."""
    initializers = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or not _plain_3x3(node):
            continue
        weight = initializers.get(node.input[1])
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT or uses[weight.name] != 1:
            continue
        out_channels, in_channels = weight.dims[:2]
        if min(out_channels, in_channels) < MIN_CHANNELS:
            continue
        if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
            continue
        if shapes is not None and not _worth_it(shapes.get(node.name)):
            continue
        found.append(_Conv(node, weight))
    return found


class _Builder:
    """Nodes and constants for the rewritten convs of one graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.initializers: list[onnx.TensorProto] = []
        self.shared_done = False

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def shared(self) -> tuple[str, str, str]:
        """Names of the fixed transforms, made once per graph."""
        names = ("winograd/input_kernels", "winograd/weight_rows", "winograd/output_rows")
        if not self.shared_done:
            self.shared_done = True
            for name, value in zip(names, (input_kernels(), weight_rows(), output_rows())):
                self.constant(name, value)
        return names

    def conv(self, conv: _Conv) -> list[onnx.NodeProto]:
        """The nodes that replace `conv`; they read its input and write its output."""
        node, weight = conv.node, conv.weight
        out_channels, in_channels = weight.dims[:2]
        p = f"{node.name or node.output[0]}/winograd/"
        x, y = node.input[0], node.output[0]
        kernels, rows, out_rows = self.shared()
        nodes: list[onnx.NodeProto] = []
        taps = numpy_helper.to_array(weight).reshape(out_channels * in_channels, 9).T
        c = self.constant

        def n(op: str, inputs: list[str], output: str, **attrs) -> str:
            nodes.append(helper.make_node(op, inputs, [p + output], name=p + output, **attrs))
            return p + output

        shape = n("Shape", [x], "shape")
        hw = n("Slice", [shape, c(p + "2", np.array([2], np.int64)), c(p + "4", np.array([4], np.int64))], "hw")
        three, four = c(p + "three", np.array([3], np.int64)), c(p + "tile", np.array([TILE], np.int64))
        tiles = n("Div", [n("Add", [hw, three], "hw_up"), four], "tiles")  # ceil(H / 4), ceil(W / 4)
        covered = n("Mul", [tiles, four], "covered")
        one = c(p + "one", np.array([1], np.int64))
        pad_end = n("Sub", [n("Add", [covered, one], "covered_1"), hw], "pad_end")  # 1 + 4h - H
        pads = n("Concat", [c(p + "pad_begin", np.array([0, 0, 1, 1, 0, 0], np.int64)), pad_end], "pads", axis=0)
        padded = n("Pad", [x, pads], "padded")
        planes = n("Reshape", [padded, c(p + "planes_shape", np.array([-1, 1, 0, 0], np.int64))], "planes")
        v = n("Conv", [planes, kernels], "v", kernel_shape=[TILE + 2, TILE + 2], strides=[TILE, TILE])
        count = n("Mul", [n("Slice", [tiles, c(p + "0", np.array([0], np.int64)), one], "rows"),
                          n("Slice", [tiles, one, c(p + "2b", np.array([2], np.int64))], "cols")], "count")
        v_shape = n("Concat", [c(p + "v_dims", np.array([-1, in_channels, POSITIONS], np.int64)), count], "v_shape", axis=0)
        v = n("Transpose", [n("Reshape", [v, v_shape], "v_tiles")], "v_by_position", perm=[0, 2, 1, 3])
        # The weight rows times 1.0 computed from this conv's input shape. Tied to the input, U is
        # made just before its use: onnxruntime orders nodes depth-first from the outputs, and a U
        # that depends on constants only would be made at the start and held (+1.3 GB measured).
        # And constant folding (onnxruntime's, onnxsim's) can't store U, 4x the conv weights.
        live = n("Cast", [n("Greater", [count, c(p + "no_tiles", np.array([0], np.int64))], "has_tiles")],
                 "live", to=onnx.TensorProto.FLOAT)
        rows = n("Mul", [rows, live], "live_rows")
        parts = []
        for start, size in channel_slices(out_channels, in_channels):
            part = c(f"{p}taps{start}", np.ascontiguousarray(taps[:, start * in_channels:(start + size) * in_channels]))
            u = n("MatMul", [rows, part], f"u_flat{start}")  # [36, size*C]
            u_shape = c(f"{p}u_shape{start}", np.array([POSITIONS, size, in_channels], np.int64))
            parts.append(n("MatMul", [n("Reshape", [u, u_shape], f"u{start}"), v], f"m{start}"))  # [N, 36, size, tiles]
        m = parts[0] if len(parts) == 1 else n("Concat", parts, "m", axis=2)
        m = n("Reshape", [m, c(p + "m_shape", np.array([0, POSITIONS, -1], np.int64))], "m_flat")
        t = n("MatMul", [out_rows, m], "out_tiles")  # [N, 16, K * tiles]
        t_shape = n("Concat", [c(p + "t_dims", np.array([-1, TILE, TILE, out_channels], np.int64)), tiles],
                    "t_shape", axis=0)
        t = n("Transpose", [n("Reshape", [t, t_shape], "t_split")], "t_nchw", perm=[0, 3, 4, 1, 5, 2])
        full = n("Concat", [c(p + "full_dims", np.array([-1, out_channels], np.int64)), covered], "full_shape", axis=0)
        t = n("Reshape", [t, full], "covered_out")
        cropped = n("Slice", [t, c(p + "crop_begin", np.array([0, 0], np.int64)), hw,
                              c(p + "crop_axes", np.array([2, 3], np.int64))], "cropped")
        if len(node.input) > 2 and node.input[2]:
            bias = {t.name: t for t in self.model.graph.initializer}[node.input[2]]
            bias_column = numpy_helper.to_array(bias).reshape(out_channels, 1, 1)
            nodes.append(helper.make_node("Add", [cropped, c(p + "bias", bias_column)], [y], name=p + "bias_add"))
        else:
            nodes.append(helper.make_node("Identity", [cropped], [y], name=p + "output"))
        return nodes


def channel_slices(out_channels: int, in_channels: int) -> list[tuple[int, int]]:
    """(first output channel, count) of each slice of U, none over MAX_U_BYTES."""
    count = max(1, math.ceil(POSITIONS * out_channels * in_channels * 4 / MAX_U_BYTES))
    size = math.ceil(out_channels / count)
    return [(start, min(size, out_channels - start)) for start in range(0, out_channels, size)]


def rewrite_convs(model: onnx.ModelProto, convs: list[_Conv]) -> list[str]:
    """Replaces `convs` in `model` (in place); returns their names. Weights move into `taps`
    initializers ([9, K*C], the same numbers), so the graph does not grow."""
    if not convs:
        return []
    builder = _Builder(model)
    chosen = {id(c.node): c for c in convs}
    records, nodes, dropped = {}, [], set()
    for node in model.graph.node:
        conv = chosen.get(id(node))
        if conv is None:
            nodes.append(node)
            continue
        replacement = builder.conv(conv)
        nodes.extend(replacement)
        name = node.name or node.output[0]
        records[name] = {
            "input": node.input[0], "output": node.output[0], "weight": conv.weight.name,
            "bias": node.input[2] if len(node.input) > 2 else "",
            "taps": [f"{name}/winograd/taps{start}" for start, _ in channel_slices(*conv.weight.dims[:2])],
            "out_channels": int(conv.weight.dims[0]), "in_channels": int(conv.weight.dims[1]),
        }
        dropped.add(conv.weight.name)
        if len(node.input) > 2 and node.input[2]:
            dropped.add(node.input[2])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    still_used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name not in dropped or t.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + builder.initializers)
    _set_metadata(model, records)
    return list(records)


def restore_convs(model: onnx.ModelProto) -> int:
    """Turns rewritten convs back into Conv nodes with their original weights; returns how many."""
    records = json.loads(_metadata(model) or "{}")
    if not records:
        return 0
    initializers = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        owner = node.name.split("/winograd/")[0] if "/winograd/" in node.name else None
        if owner in records:
            record = records[owner]
            if node.output[0] == record["output"]:  # the last node of the rewrite: put the Conv here
                inputs = [record["input"], record["weight"]] + ([record["bias"]] if record["bias"] else [])
                nodes.append(helper.make_node("Conv", inputs, [record["output"]], name=owner,
                                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]))
            continue
        nodes.append(node)
    restored = []
    for name, record in records.items():
        taps = np.concatenate([numpy_helper.to_array(initializers[t]) for t in record["taps"]], axis=1)
        weight = taps.T.reshape(record["out_channels"], record["in_channels"], 3, 3)
        restored.append(numpy_helper.from_array(np.ascontiguousarray(weight), record["weight"]))
        if record["bias"]:
            bias = numpy_helper.to_array(initializers[f"{name}/winograd/bias"]).reshape(-1)
            restored.append(numpy_helper.from_array(bias, record["bias"]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + restored)
    _set_metadata(model, {})
    return len(records)


def has_winograd(model: onnx.ModelProto) -> bool:
    return bool(json.loads(_metadata(model) or "{}"))


def _metadata(model: onnx.ModelProto) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == WINOGRAD_KEY), None)


def _set_metadata(model: onnx.ModelProto, records: dict) -> None:
    kept = [p for p in model.metadata_props if p.key != WINOGRAD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if records:
        model.metadata_props.add(key=WINOGRAD_KEY, value=json.dumps(records, sort_keys=True))


def rewrite_file(src: Path, dst: Path, input_dims_json: str) -> None:
    """Export stage: rewrites the convs of `src` that pay at `input_dims` into `dst`."""
    from sdport.export.onnx_files import save_model

    model = onnx.load_model(str(src), load_external_data=False)
    shapes = conv_input_shapes(model, src.parent, json.loads(input_dims_json))
    onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
    rewrite_convs(model, eligible_convs(model, shapes))
    save_model(model, dst)
