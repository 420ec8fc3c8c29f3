"""Self-attention as `MultiHeadAttention` instead of `Attention`, for onnxruntime's CPU provider.

onnxruntime's UNet fusion turns self-attention into com.microsoft `Attention` (packed QKV weight)
and cross-attention into `MultiHeadAttention`. On CPU only the latter runs flash attention: one
64x64-latent self-attention layer, batch 2, peaked at 2.2 GB as `Attention` (full score matrices)
and 0.15 GB as `MultiHeadAttention`, 1.3-3x faster (2 cores, onnxruntime 1.32). So each
`Attention(x, W_qkv, b_qkv)` becomes MatMul -> Add -> Split -> `MultiHeadAttention(q, k, v)`;
the weights stay where they are (the same initializers, external data untouched).
"""

from __future__ import annotations

import onnx
from onnx import helper


def unpack_self_attention(model: onnx.ModelProto) -> int:
    """Rewrites `model` in place; returns how many Attention nodes became MultiHeadAttention."""
    graph = model.graph
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "Attention" or node.domain != "com.microsoft" or len(node.input) < 3 or any(
            name for name in node.input[3:]  # a mask or past state: leave it alone
        ):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if set(attrs) - {"num_heads", "scale"} or not node.input[2]:
            nodes.append(node)
            continue
        x, weight, bias = node.input[:3]
        base = node.name or f"attention_{count}"
        qkv, biased = f"{base}/qkv", f"{base}/qkv_biased"
        q, k, v = (f"{base}/{part}" for part in "qkv")
        nodes.append(helper.make_node("MatMul", [x, weight], [qkv], name=f"{base}/MatMul"))
        nodes.append(helper.make_node("Add", [qkv, bias], [biased], name=f"{base}/Add"))
        # Split into three equal parts along the hidden axis (opset 17: no num_outputs needed).
        nodes.append(helper.make_node("Split", [biased], [q, k, v], name=f"{base}/Split", axis=-1))
        mha = helper.make_node("MultiHeadAttention", [q, k, v], list(node.output), name=f"{base}/MHA",
                               domain="com.microsoft", **attrs)
        nodes.append(mha)
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count
