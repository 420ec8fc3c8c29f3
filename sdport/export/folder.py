"""`export_model`: a checkpoint becomes an optimized, validated, self-describing ONNX folder.

Everything is written into a temporary sibling of OUT and renamed at the end, so an interrupted
or failed export never leaves a half-written model folder behind.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Literal

from sdport import __version__
from sdport.errors import SdportError
from sdport.export import optimize
from sdport.export.components import ComponentGraph, component_graphs, trace_to_onnx
from sdport.export.onnx_files import resave, sha256
from sdport.export.validate import check_parity, reference_cases
from sdport.models.manifest import COMPONENTS, GraphSpec, Manifest, write_manifest

Optimization = Literal["ort", "portable", "none"]
Reporter = Callable[[str], None]

# Errors are relative to the output's range (max |reference|).
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2
# fp32: the fp16 VAE decoder overflows (SD 1.x's VAE needs its fp32 range); the encoder is small.
FP16_COMPONENTS = ("text_encoder", "unet")


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tool_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "sdport": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _temporary_sibling(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _export_graph(
    graph: ComponentGraph, folder: Path, work: Path, *, opset: int, optimization: Optimization,
    fp16: bool, sizes: list[tuple[int, int]], report: Reporter,
) -> GraphSpec:
    """Trace, then each optimization stage, checking parity against PyTorch after every stage."""
    cases = reference_cases(graph, sizes)
    parity: dict[str, dict] = {}

    def stage(label: str, make: Callable[[Path], object], path: Path, tolerance: float) -> Path:
        start = time.perf_counter()
        make(path)
        parity[label] = check_parity(graph, path, cases, tolerance=tolerance, stage=label)
        report(
            f"  {graph.name}: {label:<8} {time.perf_counter() - start:6.1f} s, "
            f"max error {parity[label]['max_rel_error']:.1e} of range"
        )
        return path

    trace_size = (sizes[-1][0], sizes[-1][1])

    def trace(path: Path) -> None:
        trace_to_onnx(graph, path, opset=opset, trace_size=trace_size)
        resave(path)  # one external-data file instead of one per tensor

    current = stage("traced", trace, work / "traced" / "model.onnx", FP32_TOLERANCE)
    if optimization == "portable":
        current = stage("simplified", lambda p: optimize.simplify(current, p),
                        work / "simplified" / "model.onnx", FP32_TOLERANCE)
    elif optimization == "ort":
        current = stage("fused", lambda p: optimize.fuse_for_onnxruntime(current, p, graph.name),
                        work / "fused" / "model.onnx", FP32_TOLERANCE)
    precision = "fp32"
    if fp16 and graph.name in FP16_COMPONENTS:
        current = stage("fp16", lambda p: optimize.to_fp16(current, p), work / "fp16" / "model.onnx",
                        FP16_TOLERANCE)
        precision = "fp16"

    target = folder / graph.name
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    for item in current.parent.iterdir():
        shutil.move(str(item), target / item.name)
        files[f"{graph.name}/{item.name}"] = sha256(target / item.name)
    external = [f for f in files if not f.endswith(".onnx")]
    return GraphSpec(
        file=f"{graph.name}/model.onnx",
        inputs=graph.inputs,
        outputs=graph.outputs,
        opset=optimize.opset_of(target / "model.onnx"),
        precision=precision,
        optimization=optimization,
        external_data=external[0] if external else None,
        sha256=files,
        parity=parity,
    )


def _write_configs(pipeline, folder: Path) -> None:
    pipeline.text_encoder.config.to_json_file(str(folder / "text_encoder" / "config.json"))
    pipeline.unet.save_config(folder / "unet")
    for name in ("vae_decoder", "vae_encoder"):
        pipeline.vae.save_config(folder / name)
    pipeline.scheduler.save_config(folder / "scheduler")
    from sdport.export.tokenizer import save_tokenizer

    save_tokenizer(pipeline.tokenizer, folder / "tokenizer")
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(pipeline.scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae_decoder": ["diffusers", "AutoencoderKL"],
        "vae_encoder": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def export_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fp16: bool = False,
    opset: int = 17,
    optimization: Optimization = "ort",
    force: bool = False,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    report: Reporter | None = _print_stderr,
) -> Path:
    """Exports a Stable Diffusion checkpoint to an sdport/optimum ONNX folder at `out`.

    Args:
        source: a diffusers folder, a single-file `.safetensors` checkpoint, or a hub id.
        out: the folder to create; refused if it exists unless `force`.
        fp16: fp16 text encoder and UNet for GPU providers (the VAE stays fp32).
        opset: ONNX opset for tracing (17 or newer).
        optimization: "ort" (onnxruntime fusions, contrib operators), "portable" (onnxsim,
            standard operators only) or "none".
        allow_pickle: accept pickled `.ckpt`/`.bin` checkpoints (they can run code when loaded).
        config: a diffusers-format folder whose component configs match a single-file checkpoint.
        prediction_type: overrides the scheduler's (e.g. "v_prediction" for SD 2.x 768-v).
        report: receives one line per stage; None for quiet.
    Returns:
        The path of the finished folder.
    """
    from sdport.export.loaders import load_pipeline

    report = report or (lambda _message: None)
    out = Path(out)
    if out.exists() and not force:
        raise SdportError(f"{out} already exists; choose another OUT or pass --force to replace it")
    if optimization not in ("ort", "portable", "none"):
        raise SdportError(f"unknown optimization {optimization!r}; choose ort, portable or none")
    if opset < 17:
        raise SdportError(f"opset {opset} is too old: LayerNormalization needs 17 or newer")

    started = time.perf_counter()
    report(f"loading {source}")
    loaded = load_pipeline(
        source, allow_pickle=allow_pickle, config=config, prediction_type=prediction_type,
        progress=report is not None,
    )
    pipeline = loaded.pipeline
    unet_config, vae_config = pipeline.unet.config, pipeline.vae.config
    latent_multiple = 2 ** (len(unet_config.block_out_channels) - 1)
    # Two resolutions, one of them not square, so that H and W can't be confused or frozen.
    sizes = [(4 * latent_multiple, 4 * latent_multiple), (4 * latent_multiple, 6 * latent_multiple)]

    tmp = _temporary_sibling(out)
    try:
        graphs: dict[str, GraphSpec] = {}
        for index, (name, graph) in enumerate(component_graphs(pipeline).items(), start=1):
            report(f"[{index}/{len(COMPONENTS)}] {name}")
            graphs[name] = _export_graph(
                graph, tmp, tmp / ".work" / name, opset=opset, optimization=optimization,
                fp16=fp16, sizes=sizes, report=report,
            )
            shutil.rmtree(tmp / ".work" / name, ignore_errors=True)
            gc.collect()
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        _write_configs(pipeline, tmp)
        manifest = Manifest(
            family=loaded.family,
            prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
            vae_scaling_factor=float(vae_config.scaling_factor),
            latent_channels=int(unet_config.in_channels),
            vae_scale=2 ** (len(vae_config.block_out_channels) - 1),
            latent_multiple=latent_multiple,
            text_embed_dim=int(pipeline.text_encoder.config.hidden_size),
            max_tokens=int(pipeline.text_encoder.config.max_position_embeddings),
            graphs=graphs,
            sample_size=int(unet_config.sample_size),
            tools=_tool_versions(),
            source=str(loaded.source),
        )
        write_manifest(tmp, manifest)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Renames the finished folder into place; an old OUT (with --force) is removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
