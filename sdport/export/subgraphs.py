"""Names across ONNX subgraphs (If branches): what a node reads from its scope, and renaming it."""

from __future__ import annotations

import onnx


def attribute_graphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        graphs.extend(attribute.graphs)
    return graphs


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
