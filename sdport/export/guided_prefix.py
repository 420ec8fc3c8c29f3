"""Under classifier-free guidance the UNet's batch is the same latents twice: compute its start once.

With guidance, the pipeline runs the UNet on `sample = [x, x]` (and one timestep) against
`encoder_hidden_states = [uncond, cond]`. Every node that depends on the latents and the
timestep but not on the text (conv_in, the first ResNet, the first transformer's self-attention
and its cross-attention query) then computes the same numbers for both halves. On an SD 1.5 UNet
that prefix holds one of the five 64x64 self-attentions, the costliest layers of a 512 px step.

The rewrite keeps the graph's inputs, outputs and meaning for every batch. An If picks per run:

  halves equal  (batch even, non-zero, the first half of every batched shared input equal to the
                 second, value for value): the prefix on the first half, each tensor it hands on
                 concatenated with itself along the batch axis
  otherwise     the prefix as traced, on the whole batch

Tensors the prefix hands on are batch-major (batch is the outermost dimension: NCHW, [B, HW, C]
and their reshapes), so the concatenation is the full batch's tensor. Shape computations it
hands on (the integer side of the graph) are made again from full-batch tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx
from onnx import helper

from sdport.export.onnx_files import json_metadata, set_json_metadata
from sdport.export.subgraphs import copy_nodes, inline_branch, outer_references

PREFIX_KEY = "sdport.guided_prefix"  # metadata: {"shared": [input names], "nodes": count}
IF_NAME = "/guided_prefix/If"
SHAPE_OPS = {"Shape", "Size"}
THEN, ELSE = "/guided_half", "/guided_full"  # name suffixes inside the If's two branches


def _dependencies(graph: onnx.GraphProto) -> dict[str, frozenset[str]]:
    """For each tensor, the graph inputs it depends on."""
    depends: dict[str, frozenset[str]] = {value.name: frozenset([value.name]) for value in graph.input}
    for node in graph.node:
        inputs = frozenset().union(*(depends.get(name, frozenset()) for name in outer_references(node)))
        for output in node.output:
            depends[output] = inputs
    return depends


def _shape_side(graph: onnx.GraphProto) -> set[str]:
    """Tensors of the integer side of the graph: made from tensor shapes and constants only."""
    constants = {init.name for init in graph.initializer}
    constants.update(output for node in graph.node if node.op_type == "Constant" for output in node.output)
    side: set[str] = set()
    for node in graph.node:
        dynamic = [name for name in node.input if name and name not in constants]
        if node.op_type in SHAPE_OPS or (node.op_type != "Constant" and dynamic and all(n in side for n in dynamic)):
            side.update(node.output)
    return side


def _halves_equal(batched: list[str], prefix: str) -> tuple[list[onnx.NodeProto], str, dict[str, str]]:
    """Nodes computing whether every batched input's two halves are equal (batch even and > 0),
    and the first halves' names."""
    n = lambda name: f"{prefix}/{name}"  # noqa: E731

    def ints(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [n(name)],
                                value=helper.make_tensor(n(name), onnx.TensorProto.INT64, [len(values)], values))

    nodes = [
        ints("zero_dims", []),
        ints("zero", [0]),
        ints("one", [1]),
        ints("two", [2]),
        helper.make_node("Shape", [batched[0]], [n("shape")], start=0, end=1),
        helper.make_node("Div", [n("shape"), n("two")], [n("half")]),
        helper.make_node("Mul", [n("half"), n("two")], [n("twice_half")]),
        helper.make_node("Equal", [n("twice_half"), n("shape")], [n("even")]),
        helper.make_node("Greater", [n("half"), n("zero")], [n("nonempty")]),
        helper.make_node("And", [n("even"), n("nonempty")], [n("split_ok")]),
        # The first and the last max(B // 2, 1) rows: the halves when B is even, and never empty
        # for B >= 1, since onnxruntime's CUDA ReduceSum refuses an empty input (batch 1, no
        # guidance, failed on an H100). When B is odd or 1, split_ok is false whatever they hold.
        helper.make_node("Max", [n("half"), n("one")], [n("rows")]),
        helper.make_node("Sub", [n("shape"), n("rows")], [n("last_rows")]),
    ]
    condition, halves = n("split_ok"), {}
    for i, name in enumerate(batched):
        first, second = f"{n('first')}_{i}", f"{n('second')}_{i}"
        differ = f"{n('differ')}_{i}"
        nodes += [
            helper.make_node("Slice", [name, n("zero"), n("rows"), n("zero")], [first]),
            helper.make_node("Slice", [name, n("last_rows"), n("shape"), n("zero")], [second]),
            helper.make_node("Sub", [first, second], [f"{differ}_sub"]),
            helper.make_node("Abs", [f"{differ}_sub"], [f"{differ}_abs"]),
            # A sum, not a max: NaN (never equal) if either half holds NaN.
            helper.make_node("ReduceSum", [f"{differ}_abs"], [differ], keepdims=0),
            helper.make_node("CastLike", [n("zero"), differ], [f"{differ}_zero"]),
            helper.make_node("Equal", [differ, f"{differ}_zero"], [f"{differ}_none"]),
            helper.make_node("And", [condition, f"{differ}_none"], [f"{differ}_ok"]),
        ]
        condition, halves[name] = f"{differ}_ok", first
    nodes.append(helper.make_node("Reshape", [condition, n("zero_dims")], [n("condition")]))
    for node in nodes:
        node.name = node.output[0]
    return nodes, n("condition"), halves


def share_guided_prefix(model: onnx.ModelProto, shared_inputs: Iterable[str]) -> int:
    """Rewrites `model` in place so that its guided prefix runs once for two equal halves.

    `shared_inputs`: the graph inputs that are the same for both halves under guidance (the
    latents and the timestep); every other input is conditioning. Returns the number of prefix
    nodes (0: nothing to share, the model is unchanged).
    """
    graph = model.graph
    if json_metadata(model, PREFIX_KEY) is not None:
        return 0  # shared already
    shared = {value.name for value in graph.input if value.name in set(shared_inputs)}
    batched = {value.name for value in graph.input
               if value.name in shared and len(value.type.tensor_type.shape.dim) > 0}
    if not batched:
        return 0
    depends = _dependencies(graph)
    # The prefix: what depends on the batched shared inputs and nothing else. Nodes that read
    # only unbatched ones (a scalar timestep) or constants have no batch: they stay outside.
    prefix = [node for node in graph.node if depends[node.output[0]] <= shared and depends[node.output[0]] & batched]
    prefix_ids = {id(node) for node in prefix}
    producer = {output: node for node in prefix for output in node.output if output}
    read_outside = {value.name for value in graph.output}
    for node in graph.node:
        if id(node) not in prefix_ids:
            read_outside |= outer_references(node)
    handed_on = [name for node in prefix for name in node.output if name in read_outside]
    if not any(node.op_type not in SHAPE_OPS for node in prefix) or not handed_on:
        return 0
    shape_side = _shape_side(graph)
    data_out = [name for name in handed_on if name not in shape_side]
    shapes_out = [name for name in handed_on if name in shape_side]

    # The shape computations handed on are made again in the half branch from full-batch
    # tensors: the shape-side nodes they come from, reading the data tensors they measure
    # concatenated (`full`: those handed on, and any others they measure).
    full, needed, stack, seen = list(data_out), set(), list(shapes_out), set()
    while stack:
        name = stack.pop()
        if name in seen or name not in producer or name not in shape_side:
            continue
        seen.add(name)
        needed.add(id(producer[name]))
        for source in producer[name].input:
            if source in producer and source not in shape_side and source not in full:
                full.append(source)
            stack.append(source)
    shape_nodes = [node for node in prefix if id(node) in needed]

    check_nodes, condition, halves = _halves_equal(sorted(batched), "/guided_prefix")

    then_map = dict(halves)
    then_nodes = copy_nodes(prefix, THEN, then_map)
    full_map = {}
    for name in full:
        full_map[name] = name + THEN + "_twice"
        then_nodes.append(helper.make_node("Concat", [then_map[name]] * 2, [full_map[name]], axis=0,
                                           name=f"{name}{THEN}/concat"))
    then_nodes += copy_nodes(shape_nodes, THEN + "_shape", full_map)
    then_outputs = [full_map[name] for name in data_out + shapes_out]

    else_map: dict[str, str] = {}
    else_nodes = copy_nodes(prefix, ELSE, else_map)
    else_outputs = [else_map[name] for name in data_out + shapes_out]

    def branch(name: str, nodes: list[onnx.NodeProto], outputs: list[str]) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_empty_tensor_value_info(o) for o in outputs])

    choose = helper.make_node(
        "If", [condition], data_out + shapes_out, name=IF_NAME,
        then_branch=branch("guided_half", then_nodes, then_outputs),
        else_branch=branch("guided_full", else_nodes, else_outputs),
    )
    # What the prefix may read (constants, what depends on unbatched shared inputs only) goes
    # before the If; the rest after it.
    rest = [node for node in graph.node if id(node) not in prefix_ids]
    before = [node for node in rest if depends[node.output[0]] <= shared]
    after = [node for node in rest if not depends[node.output[0]] <= shared]
    del graph.node[:]
    graph.node.extend(before + check_nodes + [choose] + after)
    inside = set(producer) - set(data_out + shapes_out)
    kept_info = [value for value in graph.value_info if value.name not in inside]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    set_json_metadata(model, PREFIX_KEY, {"shared": sorted(shared), "nodes": len(prefix)})
    return len(prefix)


def restore_prefix(model: onnx.ModelProto) -> list[str]:
    """Undoes `share_guided_prefix` in place (int8 quantization does not look into If branches);
    returns the shared inputs it was made with, to make it again ([] for a graph without it)."""
    record = json_metadata(model, PREFIX_KEY)
    if record is None:
        return []
    graph = model.graph
    check = {node.name for node in graph.node if node.name.startswith("/guided_prefix/")}
    nodes = []
    for node in graph.node:
        if node.name == IF_NAME:
            nodes.extend(inline_branch(node, "else_branch", ELSE))
        elif node.name not in check:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    set_json_metadata(model, PREFIX_KEY, None)
    return record["shared"]
