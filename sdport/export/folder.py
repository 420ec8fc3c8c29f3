"""`export_model`: a checkpoint becomes an optimized, validated, self-describing ONNX folder.

Everything is written into a temporary sibling of OUT and renamed at the end, so an interrupted
or failed export never leaves a half-written model folder behind.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Literal

from sdport import __version__
from sdport.errors import SdportError, UsageError, typed_first_line
from sdport.export import optimize
from sdport.export.components import ComponentGraph, component_graphs, trace_to_onnx
from sdport.export.onnx_files import resave
from sdport.export.staging import remove_stale_siblings, replace_folder, temporary_sibling
from sdport.export.validate import ReferenceCase, check_parity, reference_cases
from sdport.models.manifest import COMPONENTS, GraphSpec, Manifest, write_manifest
from sdport.runtime.checksums import file_sha256

Optimization = Literal["ort", "portable", "none"]
Reporter = Callable[[str], None]

# Errors are relative to the output's range (max |reference|).
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2
# An fp16 export converts these, and the VAE's graphs unless fp32_vae: as diffusers' fp16 SD 1.x
# and 2.x pipelines run it, with half its activations (text-to-image at 512 px on an H100, all
# sessions held: 5.2 -> 4.0 GB of GPU memory, 0.47 -> 0.42 s warm). fp16 can overflow in some VAEs
# on some images: the runtime then stops rather than write NaN pixels, and names fp32_vae.
FP16_COMPONENTS = ("text_encoder", "unet")
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")


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


def _write_failed(exc: OSError, tmp: Path, out: Path) -> SdportError:
    """A full disk or a vanished folder mid-export, said in one line: what, where, what was cleaned up."""
    where = exc.filename or tmp
    hint = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder"
    return SdportError(
        f"export failed writing {where}: {exc.strerror or exc}; removed the partial folder {tmp}, "
        f"{out} was not written: {hint} and run the export again"
    )


class _Stages:
    """Runs export stages for one graph, checking each against the PyTorch reference outputs."""

    def __init__(self, name: str, cases: list[ReferenceCase], report: Reporter):
        self.name, self.cases, self.report = name, cases, report
        self.parity: dict[str, dict] = {}

    def run(self, label: str, make: Callable[[Path], object], path: Path, tolerance: float) -> Path:
        start = time.perf_counter()
        try:
            make(path)
        except (SdportError, OSError, MemoryError):
            raise  # already say what and where (disk full, ...)
        except Exception as exc:  # the exporter's or optimizer's own failure: name the stage
            if "No space left" in str(exc):
                raise  # a full disk reported by a C++ writer: export_model says so in one line
            raise SdportError(
                f"{self.name} ({label}): {typed_first_line(exc)}; try --no-optimize, or "
                "report this with the model's configs"
            ) from exc
        self.parity[label] = check_parity(self.name, path, self.cases, tolerance=tolerance, stage=label)
        self.report(
            f"  {self.name}: {label:<10} {time.perf_counter() - start:6.1f} s, "
            f"max error {self.parity[label]['max_rel_error']:.1e} of range"
        )
        return path


def _trace(graph: ComponentGraph, work: Path, *, opset: int, sizes: list[tuple[int, int]],
           report: Reporter) -> tuple[Path, _Stages]:
    """The only stage that needs PyTorch: reference outputs, then the trace itself."""
    stages = _Stages(graph.name, reference_cases(graph, sizes), report)

    def trace(path: Path) -> None:
        trace_to_onnx(graph, path, opset=opset, trace_size=sizes[-1])
        resave(path)  # one external-data file instead of one per tensor

    return stages.run("traced", trace, work / "traced" / "model.onnx", FP32_TOLERANCE), stages


def _graph_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))


def _native_input_dims(graph: ComponentGraph, latent: int) -> dict[str, list[int]]:
    """Input shapes at the native size: batch 2 for the UNet (guidance), 1 for the others."""
    import torch

    batch = 2 if graph.name == "unet" else 1
    example = graph.make_inputs(batch, latent, latent, torch.Generator().manual_seed(0))
    return {spec.name: list(tensor.shape) for spec, tensor in zip(graph.inputs, example)}


def _optimize(traced: Path, stages: _Stages, work: Path, *, optimization: Optimization,
              fp16: bool, half: bool, winograd: bool, native_dims: dict[str, list[int]],
              guided_shared: tuple[str, ...], ff_chunks: bool) -> tuple[Path, str]:
    """Optimization stages on the traced graph; returns the final graph and its precision.
    `fp16`: the folder is an fp16 (GPU) export; `half`: this graph is converted to fp16.
    `native_dims`: the graph's input shapes at the model's native size (which convs pay).
    `guided_shared`: inputs equal in both halves of a guided batch (empty: no guided_prefix stage).
    `ff_chunks`: the ff_chunks stage, where it pays."""
    name, current = stages.name, traced
    # The optimizers hold several copies of a graph (13.7 GB for an SD 1.5 UNet); in a child
    # process that memory goes back to the system when the stage ends, not to this process's heap.
    large = _graph_bytes(traced) >= optimize.SUBPROCESS_MIN_BYTES
    run = optimize.in_subprocess if large else optimize.in_process
    if optimization == "portable":
        current = stages.run("simplified", lambda p: run(optimize.simplify, current, p),
                             work / "simplified" / "model.onnx", FP32_TOLERANCE)
    elif optimization == "ort":
        target = "gpu" if fp16 else "cpu"
        current = stages.run("fused", lambda p: run(optimize.fuse_for_onnxruntime, current, p, name, target),
                             work / "fused" / "model.onnx", FP32_TOLERANCE)
    fused = current
    if half:
        current = stages.run("fp16", lambda p: run(optimize.to_fp16, current, p),
                             work / "fp16" / "model.onnx", FP16_TOLERANCE)
        return current, "fp16"
    # Winograd convolutions are a CPU speed-up: not in an fp16 (GPU) export, nor a portable one.
    convs = {}
    if winograd and not fp16 and optimization == "ort":
        convs = optimize.winograd_convs(current, native_dims)
    if convs:
        strips = json.dumps(convs)
        current = stages.run("winograd", lambda p: run(optimize.winograd, current, p, strips),
                             work / "winograd" / "model.onnx", FP32_TOLERANCE)
    # Like Winograd, in fp32 (CPU) folders only: on a GPU its If would stop CUDA-graph capture.
    if guided_shared and not fp16 and optimization != "none":
        shared = json.dumps(list(guided_shared))
        current = stages.run("guided", lambda p: run(optimize.guided_prefix, current, p, shared),
                             work / "guided" / "model.onnx", FP32_TOLERANCE)
    # Like Winograd, a CPU speed-up: a GPU runs fewer, larger products faster.
    chunked = []
    if ff_chunks and not fp16 and optimization == "ort":
        chunked = optimize.ff_chunk_blocks(current, fused, native_dims)
    if chunked:
        prefixes = json.dumps(chunked)
        current = stages.run("ff_chunks", lambda p: run(optimize.ff_chunks, current, p, prefixes),
                             work / "ff_chunks" / "model.onnx", FP32_TOLERANCE)
    return current, "fp32"


def _place(graph: ComponentGraph, final: Path, folder: Path, *, precision: str,
           optimization: Optimization, parity: dict) -> GraphSpec:
    """Moves the final graph (and its data file) into the folder and describes it."""
    optimize.stamp_io(final, graph.inputs, graph.outputs)
    target = folder / graph.name
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    for item in sorted(final.parent.iterdir()):
        shutil.move(str(item), target / item.name)
        files[f"{graph.name}/{item.name}"] = file_sha256(target / item.name)
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
    """diffusers'/transformers' configs, tokenizer and model_index.json, as optimum lays them out."""
    for name in COMPONENTS:
        (folder / name).mkdir(parents=True, exist_ok=True)
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
    fp32_vae: bool = False,
    opset: int = 17,
    optimization: Optimization = "ort",
    force: bool = False,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
    winograd: bool = True,
    guided_prefix: bool = True,
    ff_chunks: bool = True,
    report: Reporter | None = _print_stderr,
) -> Path:
    """Exports a Stable Diffusion checkpoint to an sdport/optimum ONNX folder at `out`.

    Args:
        source: a diffusers folder, a single-file `.safetensors` checkpoint, or a hub id.
        out: the folder to create; refused if it exists unless `force`.
        fp16: fp16 graphs (fp32 inputs and outputs) for GPU providers.
        fp32_vae: with fp16, the VAE decoder and encoder stay fp32 (more GPU memory; for VAEs
            whose activations overflow fp16).
        opset: ONNX opset for tracing (17 or newer).
        optimization: "ort" (onnxruntime fusions, contrib operators), "portable" (onnxsim,
            standard operators only) or "none".
        allow_pickle: accept pickled `.ckpt`/`.bin` checkpoints (they can run code when loaded).
        config: a diffusers-format folder whose component configs match a single-file checkpoint.
        family: "sd1" or "sd2" for a single-file checkpoint, overriding detection from its weights.
        prediction_type: overrides the scheduler's (e.g. "v_prediction" for SD 2.x 768-v).
        winograd: with "ort" optimization and fp32, 3x3 convolutions that are large at the
            model's native size become Winograd F(4x4, 3x3) (export/winograd.py), ~1.3x faster
            UNet steps on CPU.
        guided_prefix: in an fp32 export, the UNet computes its start (everything before the
            text enters) once when the two halves of a guided batch hold the same latents
            (export/guided_prefix.py): SD 1.5 guided steps 4% faster on CPU at 512 px.
        ff_chunks: in an fp32 "ort" export, the UNet's transformer feed-forwards run in chunks
            of rows where they are large at the native size (export/ff_chunks.py): SD 1.5
            steps 2-3% faster on CPU at 512 px, the same numbers.
        report: receives one line per stage; None for quiet.
    Returns:
        The path of the finished folder.
    """
    from sdport.export.loaders import load_pipeline

    quiet = report is None
    report = report or (lambda _message: None)
    out = Path(out)
    if out.exists() and not force:
        raise SdportError(f"{out} already exists; choose another OUT or pass --force to replace it")
    if optimization not in ("ort", "portable", "none"):
        raise SdportError(f"unknown optimization {optimization!r}; choose ort, portable or none")
    if fp32_vae and not fp16:
        raise UsageError("fp32_vae (--fp32-vae) needs fp16 (--fp16): without it every graph is fp32")
    if opset < 17:
        raise SdportError(f"opset {opset} is too old: LayerNormalization needs 17 or newer")
    # Before the minutes of loading: the temporary folder goes next to OUT.
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise SdportError(f"cannot create {out}: {parent} is not a writable folder; choose another OUT")

    started = time.perf_counter()
    report(f"loading {source}")
    loaded = load_pipeline(
        source, allow_pickle=allow_pickle, config=config, family=family, prediction_type=prediction_type,
        progress=not quiet,
    )
    pipeline = loaded.pipeline
    unet_config, vae_config = pipeline.unet.config, pipeline.vae.config
    latent_multiple = 2 ** (len(unet_config.block_out_channels) - 1)
    # Two resolutions, one of them not square, so that H and W can't be confused or frozen.
    sizes = [(4 * latent_multiple, 4 * latent_multiple), (4 * latent_multiple, 6 * latent_multiple)]

    remove_stale_siblings(out, report)
    tmp = temporary_sibling(out)
    try:
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
            graphs={},
            sample_size=int(unet_config.sample_size),
            tools=_tool_versions(),
            source=str(loaded.source),
        )
        graphs = component_graphs(pipeline)
        del pipeline, loaded
        for index, name in enumerate(COMPONENTS, start=1):
            report(f"[{index}/{len(COMPONENTS)}] {name}")
            work = tmp / ".work" / name
            graph = graphs.pop(name)
            traced, stages = _trace(graph, work, opset=opset, sizes=sizes, report=report)
            # Free this component's PyTorch weights before the optimizer (13.7 GB peak on an
            # SD 1.5 UNet) loads the graph: the VAE is shared by its two graphs.
            native_dims = _native_input_dims(graph, int(unet_config.sample_size))
            module = graph.module
            graph = dataclasses.replace(graph, module=None, make_inputs=None)
            del module
            gc.collect()
            half = fp16 and (name in FP16_COMPONENTS or (not fp32_vae and name in VAE_COMPONENTS))
            final, precision = _optimize(traced, stages, work, optimization=optimization, fp16=fp16,
                                         half=half, winograd=winograd, native_dims=native_dims,
                                         guided_shared=graph.guided_shared if guided_prefix else (),
                                         ff_chunks=ff_chunks)
            manifest.graphs[name] = _place(graph, final, tmp, precision=precision,
                                           optimization=optimization, parity=stages.parity)
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        write_manifest(tmp, manifest)
        replace_folder(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(exc, tmp, out) from exc
    except RuntimeError as exc:  # torch's and onnx's C++ writers report a full disk this way
        shutil.rmtree(tmp, ignore_errors=True)
        if "No space left on device" in str(exc):
            raise _write_failed(OSError(errno.ENOSPC, "No space left on device"), tmp, out) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out
