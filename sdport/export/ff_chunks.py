"""Each transformer block's feed-forward in chunks of rows, so that its activations stay in cache.

A UNet transformer block ends with norm3 -> feed-forward -> residual add, row by row over its
[B, S, D] tokens: GEGLU's two D -> H products, the gate, the H -> D product. At the 64x64 level
of a 512 px SD 1.5 step (B x S = 8192 rows) each [8192, 1280] intermediate is 42 MB, more than
this CPU's caches hold, and those products ran at 330-350 GFLOP/s where the same products on
2048 rows ran at 440-490 (onnxruntime's profiler, 2 cores). In 8 chunks along the sequence axis
the part took 44 ms instead of 57, and the whole 512 px step 2.4-3.0% less; each row's products
are the same sums, so the output is the same to the bit (benchmarks/RESULTS.md, 2026-11-27).

The rewrite keeps the graph's meaning for every input; an If picks per run:

  at least MIN_ROWS rows (B x S) and CHUNKS tokens:  Split along the sequence axis into CHUNKS
                                                     pieces, the block's nodes on each, Concat
  otherwise                                          the nodes as traced

A block is rewritten only where it pays at the folder's native size: at least MIN_ROWS rows,
and a widest intermediate of at least MIN_BYTES (SD 1.5's 64x64 and 32x32 levels; its 16x16
level, 512 rows, ran no faster in chunks, and the tiny test model's blocks are too narrow).
`restore_chunks` undoes it (int8 quantization does not look into If branches), and `rewrite_named`
does it again on the quantized graph, where the same nodes then quantize each chunk on its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdport.export.onnx_files import json_metadata, set_json_metadata
from sdport.export.subgraphs import copy_nodes, inline_branch, node_maker

CHUNKS_KEY = "sdport.ff_chunks"  # metadata: {block prefix: {"input": name, "output": name, "min_rows": n}}
CHUNKS = 8
MIN_ROWS = 2048  # 256 rows a chunk: still 10% faster than whole at 2048 rows (D 320, H 1280)
MIN_BYTES = 16 << 20
NORM = "norm3/LayerNormalization"  # the block's last LayerNorm, as diffusers' modules trace
WHOLE, CHUNK = "/in_whole", "/in_chunk"  # name suffixes inside the If's branches
# Operators that work on each row by itself (row-wise, with constant weights and biases).
# DynamicQuantizeLinear is not: its scale is the whole tensor's, so a chunked int8 graph
# quantizes each chunk on its own (no less accurate).
ROW_OPS = {
    "Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Pow", "Sqrt", "Cast", "Gelu", "FastGelu", "BiasGelu",
    "LayerNormalization", "MatMul", "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}
PRODUCTS = {"MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


@dataclasses.dataclass
class _Block:
    """The nodes from a block's norm3 input to its residual sum, in graph order."""

    prefix: str  # "/unet/down_blocks.0/attentions.0/transformer_blocks.0/"
    input: str
    output: str
    nodes: list[onnx.NodeProto]
    width: int  # the widest product output (H)


def _constants(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(output for node in graph.node if node.op_type == "Constant" for output in node.output)
    return names


def _within_rows(node: onnx.NodeProto) -> bool:
    """False for a LayerNormalization over more than the last axis of [B, S, D]."""
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
    return node.op_type != "LayerNormalization" or axis in (-1, 2)


def _block(graph: onnx.GraphProto, norm: onnx.NodeProto, producer: dict, consumers: dict,
           constants: set[str], widths: dict[str, int]) -> _Block | None:
    """The block that `norm` starts, or None where its nodes are not all row-wise."""
    start = norm.input[0]
    prefix = norm.name[: -len(NORM)]
    # The residual sum: the consumer of the block's input that adds the feed-forward's output.
    ends = [node for node in consumers.get(start, []) if node.op_type == "Add" and any(
        producer.get(name) is not None and producer[name].name.startswith(prefix + "ff/") for name in node.input)]
    if len(ends) != 1:
        return None
    inside: set[int] = set()
    stack = [ends[0]]
    while stack:
        node = stack.pop()
        if id(node) in inside:
            continue
        inside.add(id(node))
        stack.extend(producer[name] for name in node.input
                     if name and name != start and name not in constants and name in producer)
    nodes = [node for node in graph.node if id(node) in inside]
    made = {output for node in nodes for output in node.output}
    for node in nodes:
        reads = [name for name in node.input if name]
        if node.op_type not in ROW_OPS or not _within_rows(node) or any(
                n not in made and n != start and n not in constants for n in reads):
            return None  # an operator across rows, or a non-constant input from outside
        if node.op_type in PRODUCTS and node.input[1] not in constants:
            return None  # a product of two row tensors
    end = ends[0].output[0]
    if any(id(consumer) not in inside for name in made - {end} for consumer in consumers.get(name, [])):
        return None  # an intermediate read outside the block
    width = max((widths.get(node.input[1], 0) for node in nodes if node.op_type in PRODUCTS), default=0)
    return _Block(prefix, start, end, nodes, width)


def find_blocks(model: onnx.ModelProto) -> list[_Block]:
    """Every transformer block's norm3 -> feed-forward -> residual sum that is row-wise."""
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = _constants(graph)
    widths = {init.name: int(init.dims[-1]) for init in graph.initializer if len(init.dims) == 2}
    found = (_block(graph, node, producer, consumers, constants, widths)
             for node in graph.node if node.op_type == "LayerNormalization" and node.name.endswith(NORM))
    return [block for block in found if block is not None]


def eligible_blocks(model: onnx.ModelProto, shapes: dict[str, list]) -> list[_Block]:
    """The blocks worth chunking at the native size, given `shapes` (each tensor's shape there)."""
    chosen = []
    for block in find_blocks(model):
        shape = shapes.get(block.input)
        if not shape or len(shape) != 3 or shape[0] is None or shape[1] is None:
            continue
        rows = shape[0] * shape[1]
        if rows >= MIN_ROWS and rows * block.width * 4 >= MIN_BYTES:
            chosen.append(block)
    return chosen


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _choose(block: _Block, min_rows: int) -> list[onnx.NodeProto]:
    """The If for `block` and the nodes computing its condition."""
    p = block.prefix + "ff_chunks/"
    check: list[onnx.NodeProto] = []
    n = node_maker(check, p)
    shape = n("Shape", [block.input], "shape")
    batch = n("Slice", [shape, p + "zero", p + "one"], "batch")
    tokens = n("Slice", [shape, p + "one", p + "two"], "tokens")
    enough_rows = n("GreaterOrEqual", [n("Mul", [batch, tokens], "rows"), p + "min_rows"], "enough_rows")
    enough_tokens = n("GreaterOrEqual", [tokens, p + "chunks"], "enough_tokens")
    condition = n("Squeeze", [n("And", [enough_rows, enough_tokens], "both")], "condition")
    constants = [_ints(p + "zero", [0]), _ints(p + "one", [1]), _ints(p + "two", [2]),
                 _ints(p + "min_rows", [min_rows]), _ints(p + "chunks", [CHUNKS]), _ints(p + "rest", [CHUNKS - 1])]
    check[:0] = [helper.make_node("Constant", [], [c.name], name=c.name, value=c) for c in constants]

    # Chunks of tokens // CHUNKS, the last one with what is left over.
    inside: list[onnx.NodeProto] = []
    m = node_maker(inside, p)
    size = m("Div", [tokens, p + "chunks"], "size")
    last = m("Sub", [tokens, m("Mul", [size, p + "rest"], "before_last")], "last")
    sizes = m("Concat", [size] * (CHUNKS - 1) + [last], "sizes", axis=0)
    inside.append(helper.make_node("Split", [block.input, sizes], [f"{p}in{j}" for j in range(CHUNKS)],
                                   name=p + "split", axis=1))
    for j in range(CHUNKS):
        mapping = {block.input: f"{p}in{j}"}
        inside += copy_nodes(block.nodes, f"{CHUNK}{j}", mapping)
    inside.append(helper.make_node("Concat", [f"{block.output}{CHUNK}{j}" for j in range(CHUNKS)],
                                   [block.output + CHUNK], name=p + "concat", axis=1))
    whole = copy_nodes(block.nodes, WHOLE, {})

    def branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)])

    choose = helper.make_node(
        "If", [condition], [block.output], name=p + "If",
        then_branch=branch("ff_chunks", inside, block.output + CHUNK),
        else_branch=branch("ff_whole", whole, block.output + WHOLE),
    )
    return check + [choose]


def rewrite_blocks(model: onnx.ModelProto, blocks: list[_Block], min_rows: int) -> list[str]:
    """Replaces each block's nodes in `model` (in place) by its If; returns their prefixes.
    `min_rows`: the fewest rows that take the chunks (MIN_ROWS; tests set 1 or a huge number)."""
    if not blocks:
        return []
    graph = model.graph
    replaced = {id(node) for block in blocks for node in block.nodes}
    last = {id(block.nodes[-1]): block for block in blocks}  # where each If goes: after every input
    nodes = []
    for node in graph.node:
        if id(node) in last:
            nodes.extend(_choose(last[id(node)], min_rows))
        elif id(node) not in replaced:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    inner = {output for block in blocks for node in block.nodes for output in node.output} - {b.output for b in blocks}
    kept = [value for value in graph.value_info if value.name not in inner]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    records = chunk_records(model)
    records.update({block.prefix: {"input": block.input, "output": block.output, "min_rows": min_rows}
                    for block in blocks})
    set_json_metadata(model, CHUNKS_KEY, records)
    return [block.prefix for block in blocks]


def rewrite_prefixes(model: onnx.ModelProto, prefixes: list[str], min_rows: int) -> list[str]:
    """Rewrites the blocks named by their `prefixes`, which must all still be row-wise."""
    blocks = [block for block in find_blocks(model) if block.prefix in prefixes]
    if len(blocks) != len(set(prefixes)):
        missing = sorted(set(prefixes) - {block.prefix for block in blocks})
        raise ValueError(f"feed-forwards no longer row-wise: {missing[:3]} ({len(missing)} in all)")
    return rewrite_blocks(model, blocks, min_rows)


def rewrite_named(model: onnx.ModelProto, records: dict[str, dict]) -> list[str]:
    """Rewrites the blocks that `records` (chunk_records of an earlier form of `model`) name, as
    quantization does after quantizing the restored graph."""
    done = []
    for min_rows in {record["min_rows"] for record in records.values()}:
        done += rewrite_prefixes(model, [p for p, record in records.items() if record["min_rows"] == min_rows],
                                 min_rows)
    return done


def restore_chunks(model: onnx.ModelProto) -> dict[str, dict]:
    """Undoes `rewrite_blocks` in place; returns its records, to rewrite the same blocks again ({}
    for a graph without it)."""
    records = chunk_records(model)
    if not records:
        return {}
    graph = model.graph
    ifs = {record["output"] for record in records.values()}
    nodes = []
    for node in graph.node:
        if node.op_type == "If" and node.output[0] in ifs:
            nodes.extend(inline_branch(node, "else_branch", WHOLE))
        elif not any(node.name.startswith(prefix + "ff_chunks/") for prefix in records):
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    set_json_metadata(model, CHUNKS_KEY, None)
    return records


def chunk_records(model: onnx.ModelProto) -> dict[str, dict]:
    """The rewritten blocks listed in the graph's metadata, by prefix (empty for a plain graph)."""
    return json_metadata(model, CHUNKS_KEY) or {}


def rewrite_file(src: Path, dst: Path, prefixes: list[str]) -> None:
    """Export stage: rewrites the blocks of `src` named by their `prefixes` into `dst`."""
    from sdport.export.onnx_files import save_model

    model = onnx.load_model(str(src))
    rewrite_prefixes(model, prefixes, MIN_ROWS)
    save_model(model, dst)
