"""Tensor shapes of a graph at given input shapes (what the rewrites decide by)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import onnx


def tensor_shapes(model: onnx.ModelProto, folder: Path, input_dims: dict[str, list[int]]) -> dict[str, list]:
    """Each inferred tensor's shape (None for a dimension left unknown) when the graph's inputs have
    `input_dims`. onnxruntime's symbolic shape inference: it knows the contrib operators that
    onnx's does not, and does not serialize the graph (which fails over 2 GB)."""
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
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in inferred.graph.value_info
    }
