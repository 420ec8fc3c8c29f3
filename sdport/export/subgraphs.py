"""Names across ONNX subgraphs (If branches): what a node reads from its scope, and renaming it."""

from __future__ import annotations

from collections.abc import Iterable

import onnx


def attribute_graphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        graphs.extend(attribute.graphs)
    return graphs


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_maker(nodes: list[onnx.NodeProto], prefix: str):
    """n(op, inputs, output, **attrs): appends a node named and outputting `prefix + output`, and
    returns that name."""

    def n(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(onnx.helper.make_node(op, inputs, [prefix + output], name=prefix + output, **attrs))
        return prefix + output

    return n


def _locals(graph: onnx.GraphProto) -> set[str]:
    return {value.name for value in graph.input} | {init.name for init in graph.initializer}


def outer_references(node: onnx.NodeProto) -> set[str]:
    """The names a node reads from its scope: its inputs and what its subgraphs read from outside."""
    names = {name for name in node.input if name}
    for graph in attribute_graphs(node):
        local = _locals(graph)
        for inner in graph.node:
            names |= outer_references(inner) - local
            local |= set(inner.output)
        names |= {value.name for value in graph.output} - local
    return names


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name the nodes of `graph` read, in their subgraphs included."""
    return set().union(*(outer_references(node) for node in graph.node))


def rename_references(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    """Rewrites, in place, the names from its scope that `node` and its subgraphs read."""
    for i, name in enumerate(node.input):
        node.input[i] = mapping.get(name, name)
    for graph in attribute_graphs(node):
        local = _locals(graph)
        for inner in graph.node:
            rename_references(inner, {k: v for k, v in mapping.items() if k not in local})
            local |= set(inner.output)
        for value in graph.output:
            if value.name not in local:
                value.name = mapping.get(value.name, value.name)


def copy_nodes(nodes: Iterable[onnx.NodeProto], suffix: str, mapping: dict[str, str]) -> list[onnx.NodeProto]:
    """Copies of `nodes` with their outputs (and names) suffixed; reads renamed through `mapping`,
    which learns each copied output."""
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        rename_references(copy, mapping)
        for i, output in enumerate(node.output):
            if output:
                mapping[output] = copy.output[i] = output + suffix
        copy.name = node.name + suffix if node.name else ""  # onnxruntime wants names unique or empty
        copies.append(copy)
    return copies


def inline_branch(node: onnx.NodeProto, branch: str, suffix: str) -> list[onnx.NodeProto]:
    """The nodes of If `node`'s `branch` ("then_branch" or "else_branch"), to stand in its place:
    with the `suffix` that copy_nodes gave their outputs and names taken off again."""
    graph = next(attribute.g for attribute in node.attribute if attribute.name == branch)
    back = {}
    for inner in graph.node:
        for i, output in enumerate(inner.output):
            if output.endswith(suffix):
                back[output] = inner.output[i] = output[: -len(suffix)]
        inner.name = inner.name[: -len(suffix)] if inner.name.endswith(suffix) else inner.name
    for inner in graph.node:
        rename_references(inner, back)
    return list(graph.node)
