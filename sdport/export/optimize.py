"""Graph optimizations after tracing: portable simplification, onnxruntime fusions, fp16."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import onnx

from sdport.export.onnx_files import load_model, save_model

# Graphs this large (files on disk) are optimized in a child process: an SD 1.5 UNet (3.4 GB).
SUBPROCESS_MIN_BYTES = 1 << 30


def in_process(stage: Callable[..., object], *args) -> None:
    stage(*args)


def in_subprocess(stage: Callable[..., object], *args) -> None:
    """`stage(*args)` in a fresh Python (`python -m sdport.export.optimize`). Not multiprocessing:
    its spawn re-imports the caller's main script, which breaks scripts without a __main__ guard.
    A failure becomes a RuntimeError with the child's last error line, which the stage runner
    turns into one error naming the graph and stage."""
    command = [sys.executable, "-m", __name__, stage.__name__, *(str(a) for a in args)]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        if done.returncode < 0:  # the out-of-memory killer's SIGKILL, typically
            raise RuntimeError(f"the optimizer process was killed by signal {-done.returncode} (out of memory?)")
        raise RuntimeError(lines[-1] if lines else f"the optimizer process exited with {done.returncode}")


# onnxruntime.transformers' model types for each of our graphs.
ORT_MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}


def simplify(src: Path, dst: Path) -> str | None:
    """onnxsim: constant folding and dead-code removal; standard operators only (any runtime)."""
    import onnxsim

    # A path (not a proto) lets onnxsim handle graphs over protobuf's 2 GB limit.
    model, ok = onnxsim.simplify(str(src))
    if not ok:
        raise RuntimeError(f"onnxsim could not verify the simplified {src}")
    return save_model(model, dst)


def _fusion_options(component: str, for_gpu: bool):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(ORT_MODEL_TYPES[component])
    # These fusions make NhwcConv, GroupNorm, BiasSplitGelu and packed-QKV attention, which
    # have CUDA kernels only; the folder must run on every provider, CPU first.
    options.enable_nhwc_conv = False
    options.enable_group_norm = False
    options.enable_skip_group_norm = False
    options.enable_bias_splitgelu = False
    options.enable_packed_qkv = False
    options.enable_packed_kv = False
    options.enable_bias_add = False
    # A residual Add and the LayerNormalization after it become one SkipLayerNormalization only
    # in GPU (fp16) folders. On CPU it took 5-6x as long as the Add, Add and LayerNormalization it
    # replaces ([2, 4096, 320]: 6.0 against 1.2 ms; 2 cores, onnxruntime 1.32): 2% of an SD 1.5
    # UNet's 512 px step. onnxruntime's own session optimizers don't fuse them back.
    options.enable_skip_layer_norm = for_gpu
    # MultiHeadAttention runs flash attention on CPU instead of building full score matrices.
    options.use_multi_head_attention = True
    return options


def fuse_for_onnxruntime(src: Path, dst: Path, component: str, target: str = "cpu") -> str | None:
    """onnxruntime's transformer fusions (Attention, MultiHeadAttention, LayerNorm, ...) for a
    folder meant for `target` ("cpu" or "gpu": an fp16 export).

    Runs on the raw trace: after onnxsim the QuickGelu fusion crashes (FIELD_NOTES).
    """
    if target not in ("cpu", "gpu"):
        raise ValueError(f"target must be 'cpu' or 'gpu', got {target!r}")
    from onnxruntime.transformers import optimizer

    from sdport.export.attention import unpack_self_attention

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    # Its own progress bar would interleave with ours; the stage line reports the time.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        fused = optimizer.optimize_model(
            str(src),
            model_type=ORT_MODEL_TYPES[component],
            num_heads=0,
            hidden_size=0,
            optimization_options=_fusion_options(component, for_gpu=target == "gpu"),
            opt_level=0,
        )
    unpack_self_attention(fused.model)  # CPU flash attention instead of full score matrices
    return save_model(fused.model, dst)


def to_fp16(src: Path, dst: Path) -> str | None:
    """fp16 weights and compute with fp32 inputs/outputs, for GPU providers."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(load_model(src))
    # Symbolic shape inference, not onnx's: onnx's serializes the proto, which fails over 2 GB
    # (an SD 1.5 UNet), and it does not know onnxruntime's fused operators.
    model.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=True)
    return save_model(model.model, dst)


def winograd_convs(path: Path, native_dims: dict[str, list[int]]) -> dict[str, int]:
    """The 3x3 convolutions of the graph at `path` worth rewriting as Winograd, by name, with the
    strips each is transformed in."""
    from sdport.export.winograd import chosen_convs

    return chosen_convs(onnx.load_model(str(path), load_external_data=False), path.parent, native_dims)


def winograd(src: Path, dst: Path, strips_json: str) -> None:
    """The 3x3 convolutions that `strips_json` names as Winograd F(4x4, 3x3)."""
    import json

    from sdport.export.winograd import rewrite_file

    rewrite_file(src, dst, json.loads(strips_json))


def ff_chunk_blocks(path: Path, shapes_from: Path, native_dims: dict[str, list[int]]) -> list[str]:
    """The transformer feed-forwards of the graph at `path` worth chunking, by block prefix.
    `shapes_from`: the same graph before the rewrites with If nodes (Winograd, guided prefix),
    which symbolic shape inference can't follow."""
    from sdport.export.ff_chunks import eligible_blocks, find_blocks
    from sdport.export.shapes import tensor_shapes

    model = onnx.load_model(str(path), load_external_data=False)
    if not find_blocks(model):
        return []
    plain = onnx.load_model(str(shapes_from), load_external_data=False)
    return [block.prefix for block in eligible_blocks(model, tensor_shapes(plain, shapes_from.parent, native_dims))]


def ff_chunks(src: Path, dst: Path, prefixes_json: str) -> None:
    """The transformer feed-forwards that `prefixes_json` names, in chunks of rows."""
    import json

    from sdport.export.ff_chunks import rewrite_file

    rewrite_file(src, dst, json.loads(prefixes_json))


def guided_prefix(src: Path, dst: Path, shared_json: str) -> None:
    """The nodes that guidance's two equal halves compute alike, computed once for both."""
    import json

    from sdport.export.guided_prefix import share_guided_prefix

    model = load_model(src)
    share_guided_prefix(model, json.loads(shared_json))
    save_model(model, dst)


def opset_of(path: Path) -> int:
    model = onnx.load_model(str(path), load_external_data=False)
    return max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def stamp_io(path: Path, inputs, outputs) -> None:
    """Rewrites the graph's declared I/O dims to the manifest's (fusions rename symbolic dims)."""
    model = onnx.load_model(str(path), load_external_data=False)
    for values, specs in ((model.graph.input, inputs), (model.graph.output, outputs)):
        by_name = {spec.name: spec for spec in specs}
        for value in values:
            spec = by_name[value.name]
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for dim in spec.shape:
                entry = shape.dim.add()
                if isinstance(dim, str):
                    entry.dim_param = dim
                else:
                    entry.dim_value = dim
    onnx.save_model(model, str(path))  # the external-data references stay as they are


if __name__ == "__main__":  # in_subprocess: python -m sdport.export.optimize STAGE SRC DST [ARG]
    stage_name, src, dst, *rest = sys.argv[1:]
    stages = {"simplify": simplify, "fuse_for_onnxruntime": fuse_for_onnxruntime, "to_fp16": to_fp16,
              "winograd": winograd, "guided_prefix": guided_prefix, "ff_chunks": ff_chunks}
    stages[stage_name](Path(src), Path(dst), *rest)
