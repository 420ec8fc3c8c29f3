"""3x3 convolutions as Winograd F(4x4, 3x3): 2.25 multiplications per output instead of 9.

onnxruntime's CPU Conv is an im2col GEMM that already runs near this CPU's best fp32 rate
(benchmarks/profile_unet.py), so fewer multiplications is what is left. A 3x3 Conv whose input
at the folder's native size has at least MIN_TILES 4x4 output tiles becomes standard ONNX
operators, any runtime can run them, under an If that picks per run by the actual input:

  Winograd, with at least MIN_TILES tiles (and a tile row per strip, below):
    input tiles:  a 6x6 stride-4 Conv (padding the input itself) with the fixed B^T.d.B kernels
                  -> 36 planes
    products:     one batched MatMul per 6x6 tile position, U[36, K, C] @ V[36, C, tiles]
    output tiles: MatMul with the fixed A^T.m.A rows, then DepthToSpace back to NCHW, cropped
                  only where the tiles pass the input's edge
  the direct sum over the 9 taps, with fewer (the 16x16 level of a 512 px UNet at 256 px).

Where the transformed input V would pass MAX_STRIP_BYTES at the native size, the tiles go
through those three steps in horizontal strips of tile rows, one strip after the other.

The weights are stored once, as the 3x3 taps ([9, K*C], one initializer per slice of output
channels), which both branches read as they are.
U = G.g.G^T is made from them at every run, not stored (stored, it would be 4x the conv
weights: 6.8 GB on an SD 1.5 UNet). Measured on 2 cores (2026-11-26): Winograd 1.8-2.4x faster
than onnxruntime's Conv from 16x16 to 64x64 (0.6x at 8x8, which is why the If), the direct
branch 0.9-1.0x of Conv at 8x8; error 1e-5 of the output range per conv.

`restore_convs` undoes it (int8 quantization wants Conv nodes); the rewritten convs are listed
in the graph's metadata under WINOGRAD_KEY.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdport.export.onnx_files import json_metadata, set_json_metadata
from sdport.export.shapes import tensor_shapes
from sdport.export.subgraphs import attributes, graph_reads, node_maker, outer_references

WINOGRAD_KEY = "sdport.winograd"
TILE = 4  # output tile side; input tiles are TILE + 2 = 6
# A conv is rewritten when its input at the native size has at least this many tiles (16x16
# pixels; the If applies the same rule per run).
MIN_TILES = 16
# The transformed input (2.25x the input) is made and used in strips of tile rows of at most
# this many bytes per image: whole, it is memory traffic that outweighs the saved products. One
# conv, batch 1, 2 cores, time against Conv (2026-11-26): 512->512 channels at 256x256 (288 MiB
# whole) 0.40x; 256->256 at 512x512 (576 MiB) 0.99x whole, 0.53x in strips; 256->128 there
# 1.33x whole, 0.61x in strips. SD's 512 px VAE decode: 13.1 s with the limit at 128 MiB and no
# strips (the larger convs left as Conv), 9.6 s at 320 MiB, 8.5 s in strips (peak 1.3, 1.9 and
# 1.6 GB); smaller strips (32-64 MiB) gained nothing more.
MAX_STRIP_BYTES = 128 << 20
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


@dataclasses.dataclass(frozen=True)
class _Conv:
    node: onnx.NodeProto
    weight: onnx.TensorProto
    strips: int = 1  # horizontal strips of tiles transformed one after the other


def _plain_3x3(node: onnx.NodeProto) -> bool:
    """Stride 1, dilation 1, one group, padding 1 on every side: what the rewrite computes."""
    a = attributes(node)
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
    """Each Conv's input shape when the graph's inputs have `input_dims`."""
    shapes = tensor_shapes(model, folder, input_dims)
    return {n.name: shapes.get(n.input[0]) for n in model.graph.node if n.op_type == "Conv"}


def _strips(shape: list | None) -> int:
    """How many strips a conv with input `shape` (at the native size) is transformed in; 0 where
    Winograd does not pay (too few tiles, or an unknown shape)."""
    if not shape or len(shape) != 4 or any(d is None for d in shape[1:]):
        return 0
    _batch, channels, height, width = shape
    tile_rows, tile_cols = math.ceil(height / TILE), math.ceil(width / TILE)
    if tile_rows * tile_cols < MIN_TILES:
        return 0
    transformed = channels * POSITIONS * tile_rows * tile_cols * 4
    return min(math.ceil(transformed / MAX_STRIP_BYTES), tile_rows)


def eligible_convs(model: onnx.ModelProto, shapes: dict[str, list] | None) -> list[_Conv]:
    """Plain fp32 3x3 convs with constant weights and at least MIN_CHANNELS in and out; with
    `shapes` (each conv's input at the folder's native size), only those where Winograd pays."""
    initializers = {t.name: t for t in model.graph.initializer}
    uses = collections.Counter(name for node in model.graph.node for name in outer_references(node))
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
        strips = 1 if shapes is None else _strips(shapes.get(node.name))
        if strips:
            found.append(_Conv(node, weight, strips))
    return found


class _Builder:
    """Nodes and constants for the rewritten convs of one graph."""

    def __init__(self, model: onnx.ModelProto, min_tiles: int):
        self.existing = {t.name: t for t in model.graph.initializer}
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.min_tiles = min_tiles

    def constant(self, name: str, value: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(value, name)
        return name

    def ints(self, *values: int) -> str:
        """An int64 vector shared by all rewritten convs (shape arithmetic)."""
        return self.constant("winograd/ints_" + "_".join(str(v) for v in values), np.array(values, np.int64))

    def conv(self, conv: _Conv) -> list[onnx.NodeProto]:
        """The nodes that replace `conv`; they read its input and write its output."""
        node, weight = conv.node, conv.weight
        out_channels, in_channels = weight.dims[:2]
        p = f"{node.name or node.output[0]}/winograd/"
        x, y = node.input[0], node.output[0]
        ints = self.ints
        nodes: list[onnx.NodeProto] = []
        n = node_maker(nodes, p)

        # ceil(H / 4) x ceil(W / 4) tiles: Winograd where there are MIN_TILES, else the direct sum.
        shape = n("Shape", [x], "shape")
        hw = n("Slice", [shape, ints(2), ints(4)], "hw")
        tiles = n("Div", [n("Add", [hw, ints(TILE - 1)], "hw_up"), ints(TILE)], "tiles")
        tile_rows = n("Slice", [tiles, ints(0), ints(1)], "tile_rows")
        tile_cols = n("Slice", [tiles, ints(1), ints(2)], "tile_cols")
        count = n("Mul", [tile_rows, tile_cols], "count")
        enough = n("Greater", [count, ints(self.min_tiles - 1)], "enough_tiles")
        if conv.strips > 1:  # and a tile row per strip
            enough = n("And", [enough, n("Greater", [tile_rows, ints(conv.strips - 1)], "enough_rows")], "enough")
        use_winograd = n("Squeeze", [enough], "use_winograd")

        # The stored taps get their shape from a value computed from the input's height and width
        # (1, as there are tiles), so constant folding (onnxruntime's, onnxsim's) can't store what
        # the branches make of them (U, 4x the weights; or a transposed copy). Tied to the input,
        # those transforms also run just before their use: onnxruntime orders nodes depth-first
        # from the outputs, and transforms of constants only would run at the start and be held
        # (+1.3 GB measured). The channel count would not do: it is a fixed dim, folded.
        one = n("Cast", [n("Greater", [count, ints(0)], "has_tiles")], "one", to=onnx.TensorProto.INT64)
        # One initializer per slice of output channels (channel_slices), read as it is by both
        # branches: slicing one stored [9, K*C] at run time copied 0.1 s worth of a 512 px UNet step.
        taps = numpy_helper.to_array(weight).reshape(out_channels, in_channels, 9)
        live_taps = []
        for start, size in channel_slices(out_channels, in_channels):
            stored = self.constant(tap_name(p, start), taps[start : start + size].reshape(-1, 9).T.copy())
            # One Mul for the whole shape: onnxruntime's ReshapeFusion rewrites a Concat of known
            # dims and one computed dim as a constant shape (the computed one becomes -1), then folds.
            shape = n("Mul", [one, ints(9, size * in_channels)], f"taps_shape{start}")
            live_taps.append(n("Reshape", [stored, shape], f"live_taps{start}"))  # [9, size*C]
        branches = {
            "then_branch": self._winograd_branch(p, x, hw, (tiles, tile_rows, tile_cols), out_channels, in_channels,
                                                 live_taps, conv.strips),
            "else_branch": self._direct_branch(p, x, hw, one, out_channels, in_channels, live_taps),
        }
        chosen = n("If", [use_winograd], "chosen", **branches)
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(self.existing[node.input[2]]).reshape(out_channels, 1, 1)
            nodes.append(helper.make_node("Add", [chosen, self.constant(p + "bias", bias)], [y], name=p + "bias_add"))
        else:
            nodes.append(helper.make_node("Identity", [chosen], [y], name=p + "output"))
        return nodes

    def _winograd_branch(self, p: str, x: str, hw: str, tile_grid: tuple[str, str, str], out_channels: int,
                         in_channels: int, live_taps: list[str], strips: int) -> onnx.GraphProto:
        """`tile_grid`: the outer graph's tile counts, [rows, cols] and each alone."""
        ints = self.ints
        tiles, tile_rows, tile_cols = tile_grid
        nodes: list[onnx.NodeProto] = []
        n = node_maker(nodes, p)
        # No Pad node: the input transform's Conv pads by itself (_Products.tiles). onnxruntime's
        # Pad runs on one thread: 12 ms per 134 MB, 0.17 s of a 512 px VAE decode.
        batch = n("Slice", [n("Shape", [x], "x_shape"), ints(0), ints(1)], "batch")
        products = _Products(self, n, batch, out_channels, in_channels, live_taps)
        if strips == 1:
            blocks = products.tiles(x, tiles, "", first=True, last=True)

            def covered(m, output: str) -> str:
                return _tiles_to_nchw(m, blocks, output)
        else:
            # Strip i: tile rows [i*R/S, (i+1)*R/S) of R. Its tiles read the input rows from 1 above
            # its first output row to 1 below its last: 4 * rows + 2, less the picture's own edges.
            bounds = [n("Div", [n("Mul", [tile_rows, ints(i)], f"rows_x{i}"), ints(strips)], f"row{i}")
                      for i in range(1, strips)]
            bounds = [ints(0)] + bounds + [tile_rows]
            height = n("Slice", [hw, ints(0), ints(1)], "height")
            outs = []
            for i, (first, end) in enumerate(zip(bounds, bounds[1:])):
                # Max: a strip that never runs (fewer tile rows than strips) may start at row 0; -1
                # would count from the end, and a static-shape graph's inference fails on 0 rows.
                top = ints(0)
                if i > 0:
                    above = n("Sub", [n("Mul", [first, ints(TILE)], f"strip{i}_first"), ints(1)], f"strip{i}_above")
                    top = n("Max", [above, ints(0)], f"strip{i}_top")
                bottom = height if i == strips - 1 else n("Add", [n("Mul", [end, ints(TILE)], f"strip{i}_end"),
                                                                  ints(1)], f"strip{i}_bottom")
                strip = n("Slice", [x, top, bottom, ints(2)], f"strip{i}")
                rows = n("Sub", [end, first], f"strip{i}_rows")
                blocks = products.tiles(strip, n("Concat", [rows, tile_cols], f"strip{i}_tiles", axis=0), f"_s{i}",
                                        first=i == 0, last=i == strips - 1)
                outs.append(_tiles_to_nchw(n, blocks, f"covered_out_s{i}"))

            def covered(m, output: str) -> str:
                return m("Concat", outs, output, axis=2)
        # The tiles cover 4 * ceil(H / 4) rows and columns: cropped to H x W where that is more.
        # An If makes the covered output in each of its branches, so that where the tiles end at
        # the edge (SD's usual sizes) no Slice or Identity copies the whole tensor (one thread, 7
        # ms per 134 MB: an If's branch output that is an outer value is copied).
        extra = n("ReduceSum", [n("Sub", [n("Mul", [tiles, ints(TILE)], "covered_size"), hw], "past_edge")],
                  "extra", keepdims=0)
        is_exact = n("Equal", [extra, self.constant("winograd/zero", np.array(0, np.int64))], "exact")
        exact_nodes: list[onnx.NodeProto] = []
        exact = covered(node_maker(exact_nodes, p), "exact_out")
        cropped_nodes: list[onnx.NodeProto] = []
        m = node_maker(cropped_nodes, p)
        cropped = m("Slice", [covered(m, "covered_out"), ints(0, 0), hw, ints(2, 3)], "cropped_out")
        n("If", [is_exact], "winograd_out", then_branch=_branch(p + "exact", exact_nodes, exact),
          else_branch=_branch(p + "cropped", cropped_nodes, cropped))
        return _branch(p + "winograd", nodes, p + "winograd_out")

    def _direct_branch(self, p: str, x: str, hw: str, one: str, out_channels: int, in_channels: int,
                       live_taps: list[str]) -> onnx.GraphProto:
        """The plain convolution from the stored taps, for inputs with few tiles: the sum over the
        9 taps of W_tap [K, C] @ (the input shifted by the tap), as one batched MatMul per slice
        of output channels. The shifted copies are 9x the input, small where this runs (under
        MIN_TILES tiles)."""
        ints = self.ints
        nodes: list[onnx.NodeProto] = []
        n = node_maker(nodes, p)
        padded = n("Pad", [x, ints(0, 0, 1, 1, 0, 0, 1, 1)], "direct_padded")
        shifted = []
        for dy in range(3):
            for dx in range(3):
                window = n("Slice", [padded, ints(dy, dx), n("Add", [hw, ints(dy, dx)], f"end{dy}{dx}"), ints(2, 3)],
                           f"shift{dy}{dx}")
                shifted.append(n("Unsqueeze", [window, ints(1)], f"shift{dy}{dx}_5d"))
        pixels = n("Mul", [n("Slice", [hw, ints(0), ints(1)], "height"), n("Slice", [hw, ints(1), ints(2)], "width")],
                   "pixels")
        stack_shape = n("Concat", [ints(-1, 9, in_channels), pixels], "stack_shape", axis=0)
        stack = n("Reshape", [n("Concat", shifted, "stack_5d", axis=1), stack_shape], "stack")  # [N, 9, C, H*W]
        parts = []
        for (start, size), taps in zip(channel_slices(out_channels, in_channels), live_taps):
            # [9, size, C]; the shape from `one`, as in conv()
            taps_3d = n("Reshape", [taps, n("Mul", [one, ints(9, size, in_channels)], f"taps_3d_shape{start}")],
                        f"taps_3d{start}")
            parts.append(n("MatMul", [taps_3d, stack], f"per_tap{start}"))  # [N, 9, size, H*W]
        per_tap = parts[0] if len(parts) == 1 else n("Concat", parts, "per_tap", axis=2)
        summed = n("ReduceSum", [per_tap, ints(1)], "summed", keepdims=0)
        out_shape = n("Concat", [ints(-1, out_channels), hw], "direct_shape", axis=0)
        n("Reshape", [summed, out_shape], "direct_out")
        return _branch(p + "direct", nodes, p + "direct_out")


class _Products:
    """The Winograd products of one conv over a padded input (or a strip of it), sharing U."""

    def __init__(self, builder: _Builder, n, batch: str, out_channels: int, in_channels: int,
                 live_taps: list[str]):
        self.builder, self.n, self.batch = builder, n, batch
        self.out_channels, self.in_channels = out_channels, in_channels
        self.live_taps = live_taps
        self.u: dict[int, str] = {}

    def _u(self, start: int, size: int, taps: str) -> str:
        """U = G.g.G^T [36, size, C] of one slice of output channels, made at its first use."""
        if start not in self.u:
            rows = self.builder.constant("winograd/weight_rows", weight_rows())
            flat = self.n("MatMul", [rows, taps], f"u_flat{start}")
            self.u[start] = self.n("Reshape", [flat, self.builder.ints(POSITIONS, size, self.in_channels)], f"u{start}")
        return self.u[start]

    def tiles(self, rows: str, tiles: str, suffix: str, first: bool, last: bool) -> str:
        """[N, 16 * K, tile rows, tile cols], each tile's 4x4 outputs as the blocks of
        `_tiles_to_nchw`, from the input `rows` that these tiles read.

        `first` / `last`: whether they hold the picture's top / bottom edge. There the rows get
        the conv's padding of 1 above, and 4 below: 3 more than the conv's own, so that ceil(H / 4)
        tile rows fit whatever the height (what tiles cover past the picture is cropped after the
        products). Columns are always whole, padded 1 left and 4 right.
        """
        n, ints, c = self.n, self.builder.ints, self.builder.constant
        k, channels = self.out_channels, self.in_channels
        planes = n("Reshape", [rows, ints(-1, 1, 0, 0)], f"planes{suffix}")  # [N*C, 1, ...]
        count = n("ReduceProd", [tiles], f"tile_count{suffix}", keepdims=1)

        # Input transform: 36 planes per channel, one value per tile -> [N, 36, C, tiles].
        v = n("Conv", [planes, c("winograd/input_kernels", input_kernels())], f"v{suffix}",
              kernel_shape=[TILE + 2, TILE + 2], strides=[TILE, TILE],
              pads=[1 if first else 0, 1, TILE if last else 0, TILE])
        # The batch is given, not -1: where a graph's shapes are static, onnxruntime infers shapes
        # through strips that never run (fewer tile rows than strips), and -1 next to a 0 fails.
        v_shape = n("Concat", [self.batch, ints(channels, POSITIONS), count], f"v_shape{suffix}", axis=0)
        v = n("Transpose", [n("Reshape", [v, v_shape], f"v_tiles{suffix}")], f"v_by_position{suffix}",
              perm=[0, 2, 1, 3])

        # Products, one slice of output channels at a time.
        parts = [n("MatMul", [self._u(start, size, taps), v], f"m{start}{suffix}")  # [N, 36, size, tiles]
                 for (start, size), taps in zip(channel_slices(k, channels), self.live_taps)]
        m = parts[0] if len(parts) == 1 else n("Concat", parts, f"m{suffix}", axis=2)

        # Output transform: 4x4 outputs per tile.
        k_count = n("Mul", [count, ints(k)], f"k_count{suffix}")
        m = n("Reshape", [m, n("Concat", [self.batch, ints(POSITIONS), k_count], f"m_shape{suffix}", axis=0)],
              f"m_flat{suffix}")
        t = n("MatMul", [c("winograd/output_rows", output_rows()), m], f"out_tiles{suffix}")  # [N, 16, K*tiles]
        t_shape = n("Concat", [self.batch, ints(TILE * TILE * k), tiles], f"t_shape{suffix}", axis=0)
        return n("Reshape", [t, t_shape], f"t_blocks{suffix}")


def _tiles_to_nchw(n, blocks: str, output: str) -> str:
    """[N, K, 4 * tile rows, 4 * tile cols] from `_Products.tiles`' blocks."""
    # Row a*4+b of a tile's outputs is the block offset (a, b) of DepthToSpace's DCR order; it
    # ran 4.6x faster than the same Reshape + 6-D Transpose (0.25 s of a 512 px UNet step).
    return n("DepthToSpace", [blocks], output, blocksize=TILE, mode="DCR")


def _branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    """An If branch computing `output` (NCHW float) from the outer graph's values."""
    out = helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
    return helper.make_graph(nodes, name, [], [out])


def tap_name(prefix: str, start: int) -> str:
    """The initializer holding the taps [9, size*C] of the slice of output channels from `start`."""
    return f"{prefix}taps{start}"


def channel_slices(out_channels: int, in_channels: int) -> list[tuple[int, int]]:
    """(first output channel, count) of each slice of U, none over MAX_U_BYTES."""
    count = max(1, math.ceil(POSITIONS * out_channels * in_channels * 4 / MAX_U_BYTES))
    size = math.ceil(out_channels / count)
    return [(start, min(size, out_channels - start)) for start in range(0, out_channels, size)]


def rewrite_convs(model: onnx.ModelProto, convs: list[_Conv], min_tiles: int = MIN_TILES) -> list[str]:
    """Replaces `convs` in `model` (in place); returns their names. Weights move into `taps`
    initializers ([9, K*C], the same numbers), so the graph does not grow. `min_tiles`: the
    fewest tiles that take the Winograd branch (tests set 1 or a huge number to pick one)."""
    if not convs:
        return []
    builder = _Builder(model, min_tiles)
    chosen = {id(c.node): c for c in convs}
    records, nodes, dropped = winograd_records(model), [], set()
    before = len(records)
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
            "taps": [tap_name(f"{name}/winograd/", start) for start, _ in
                     channel_slices(int(conv.weight.dims[0]), int(conv.weight.dims[1]))],
            "out_channels": int(conv.weight.dims[0]), "in_channels": int(conv.weight.dims[1]),
            "strips": conv.strips,
        }
        dropped.add(conv.weight.name)
        if len(node.input) > 2 and node.input[2]:
            dropped.add(node.input[2])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    still_used = graph_reads(model.graph)
    kept = [t for t in model.graph.initializer if t.name not in dropped or t.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + list(builder.initializers.values()))
    set_json_metadata(model, WINOGRAD_KEY, records)
    return list(records)[before:]


def rewrite_chosen(model: onnx.ModelProto, strips: dict[str, int]) -> list[str]:
    """Rewrites the convs named in `strips`, each transformed in its number of strips, in place.
    Raises if one no longer qualifies."""
    convs = [dataclasses.replace(c, strips=strips[c.node.name])
             for c in eligible_convs(model, None) if c.node.name in strips]
    if len(convs) != len(strips):  # e.g. a pass in between gave one of them other weights
        missing = sorted(set(strips) - {c.node.name for c in convs})
        raise ValueError(f"convs no longer eligible for Winograd: {missing[:3]} ({len(missing)} in all)")
    return rewrite_convs(model, convs)


def restore_convs(model: onnx.ModelProto) -> int:
    """Turns rewritten convs back into Conv nodes with their original weights; returns how many."""
    records = winograd_records(model)
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
        # A str: one [9, K*C] initializer, as exports made between commits 2f9c3c7 and a9dc2f4 stored them.
        names = [record["taps"]] if isinstance(record["taps"], str) else record["taps"]
        taps = np.concatenate([numpy_helper.to_array(initializers[name]) for name in names], axis=1)
        weight = taps.T.reshape(record["out_channels"], record["in_channels"], 3, 3)
        restored.append(numpy_helper.from_array(np.ascontiguousarray(weight), record["weight"]))
        if record["bias"]:
            bias = numpy_helper.to_array(initializers[f"{name}/winograd/bias"]).reshape(-1)
            restored.append(numpy_helper.from_array(bias, record["bias"]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = graph_reads(model.graph)
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + restored)
    set_json_metadata(model, WINOGRAD_KEY, {})
    return len(records)


def winograd_records(model: onnx.ModelProto) -> dict[str, dict]:
    """The rewritten convs listed in the graph's metadata, by name (empty for a plain graph)."""
    return json_metadata(model, WINOGRAD_KEY) or {}


def has_winograd(model: onnx.ModelProto) -> bool:
    return bool(winograd_records(model))


def chosen_convs(model: onnx.ModelProto, folder: Path, input_dims: dict[str, list[int]]) -> dict[str, int]:
    """The convs of `model` (its data in `folder`) where Winograd pays when the graph's inputs have
    `input_dims`, by name, with the strips each is transformed in."""
    if not eligible_convs(model, None):  # no shape inference for a graph with no candidate
        return {}
    return {c.node.name: c.strips for c in eligible_convs(model, conv_input_shapes(model, folder, input_dims))}


def rewrite_file(src: Path, dst: Path, strips: dict[str, int]) -> None:
    """Export stage: rewrites the convs of `src` that `strips` names (chosen_convs) into `dst`."""
    from sdport.export.onnx_files import save_model

    model = onnx.load_model(str(src))
    rewrite_chosen(model, strips)
    save_model(model, dst)
