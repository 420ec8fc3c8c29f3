"""`quantize_model`: a copy of an exported folder whose UNet has int8 weights (CPU, opt-in).

int8 weights, activations quantized per run: onnxruntime's dynamic quantization for the MatMuls,
and every conv (the Winograd ones of the export undone) as an int8 matrix product
(export/int8_convs.py). Measured on an SD 1.5-sized UNet at 512 px, 2 cores (benchmarks/RESULTS.md):
a step in well under half the time of fp32 PyTorch's, text-to-image at under 0.4x its peak
memory. It changes the images: the error against the fp32 folder is measured here (UNet output)
and by benchmarks/bench_sd.py (whole images), and printed.
Only the UNet is quantized: it holds 86% of the weights and nearly all of the time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sdport.errors import SdportError
from sdport.export.onnx_files import save_model
from sdport.export.staging import remove_stale_siblings, replace_folder, temporary_sibling
from sdport.models.manifest import read_manifest, write_manifest
from sdport.runtime.checksums import file_sha256

Reporter = Callable[[str], None]
QUANTIZED = "unet"


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quantize_unet(src: Path, dst: Path) -> None:
    """The graph at `src` with int8 MatMuls and convs, written to `dst` (+ its data file).

    Its Winograd convs (export/winograd.py) become int8 products too: on a 2-core Zen 4
    (2026-11-28, benchmarks/RESULTS.md) SD 1.5's 512 px int8 step took 3.99 s instead of 4.39 s
    with them kept fp32 Winograd and the others as onnxruntime's ConvInteger, a cold 10-step
    image 49.4 s instead of 68.1 at 1.47 GB peak instead of 2.09, 44.6 dB PSNR against the fp32
    image instead of 45.7. (Winograd's own products in int8 are no option: F(4x4, 3x3)'s
    transforms took a conv's error from 1% to 14%.)"""
    import logging

    import onnx
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from sdport.export.ff_chunks import rewrite_named as rewrite_chunks
    from sdport.export.guided_prefix import share_guided_prefix
    from sdport.export.int8_convs import rewrite_convs as rewrite_int8_convs

    # Shape inference can't type the outputs of contrib ops (MultiHeadAttention); all are fp32.
    FLOAT = TensorProto.FLOAT

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs one line per skipped node
    work = dst.parent / ".matmul"
    work.mkdir(parents=True, exist_ok=True)
    try:
        source, guided_shared, chunked = _quantizer_input(src, work / "source")
        # int8 MatMul weights; only weights (MatMulConstBOnly): attention inputs stay fp32.
        quantize_dynamic(source, work / "model.onnx", op_types_to_quantize=["MatMul"],
                         weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": FLOAT})
        model = onnx.load_model(str(work / "model.onnx"))
        rewrite_int8_convs(model)
        if guided_shared:  # back, as the chunks, after the quantizer
            share_guided_prefix(model, guided_shared)
        rewrite_chunks(model, chunked)
        save_model(model, dst)  # our layout: one file, or one model.onnx_data when over 2 GB
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quantizer_input(src: Path, work: Path) -> tuple[Path, list[str], dict[str, dict]]:
    """A copy of `src` that the quantizer can read, the inputs its guided prefix shares ([]
    without one), and its feed-forward chunks' records.

    The copy imports the com.microsoft domain, which the quantizer's shape inference needs for
    the fused attention nodes (onnxruntime itself loads the graph without it), and has its
    Winograd convs back as Conv nodes and its guided prefix and chunks undone: the quantizer
    does not look into If branches."""
    import onnx

    from sdport.export.attention import unpack_self_attention
    from sdport.export.ff_chunks import restore_chunks
    from sdport.export.guided_prefix import restore_prefix
    from sdport.export.onnx_files import save_model
    from sdport.export.winograd import has_winograd, restore_convs
    from sdport.runtime.graph_files import external_data_locations

    work.mkdir(parents=True, exist_ok=True)
    model = onnx.load_model(str(src), load_external_data=False)
    chunked = restore_chunks(model)
    guided_shared = restore_prefix(model)
    # Folders exported before attention.py: self-attention as CPU flash attention too (exact).
    unpack_self_attention(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    if has_winograd(model):
        # restore_convs needs the weights in memory: it rebuilds each conv's weight from its taps.
        onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
        restore_convs(model)
        save_model(model, work / src.name)
        return work / src.name, guided_shared, chunked
    for location in external_data_locations(src):  # copied: onnx refuses hard-linked data files
        shutil.copyfile(src.parent / location, work / location)
    onnx.save_model(model, str(work / src.name))
    return work / src.name, guided_shared, chunked


def unet_feeds(manifest, latent: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random batch-2 UNet inputs at a latent size of `latent` x `latent`, as guidance makes them
    (the same latents twice, two text embeddings) and the manifest declares them (also the
    benchmarks' inputs)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in manifest.graphs[QUANTIZED].inputs:
        if spec.name == "sample":
            latents = rng.standard_normal((1, manifest.latent_channels, latent, latent), dtype=np.float32)
            feeds[spec.name] = np.concatenate([latents, latents])
        elif spec.name == "timestep":
            shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
            feeds[spec.name] = np.full(shape, 500, dtype=spec.dtype)
        elif spec.name == "encoder_hidden_states":
            shape = (2, manifest.max_tokens, manifest.text_embed_dim)
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def unet_error(reference: Path, quantized: Path, feeds: dict[str, np.ndarray]) -> dict:
    """Max and mean |int8 - fp32| of the UNet output, relative to max |fp32|, in onnxruntime CPU."""
    import onnxruntime as ort

    outputs = []
    for path in (reference, quantized):  # one session at a time: an SD 1.5 UNet is 3.4 GB in fp32
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds)[0].astype(np.float32))
        del session
    want, got = outputs
    scale = float(np.max(np.abs(want))) or 1.0
    return {
        "output": "out_sample", "batch": 2, "latent": list(feeds["sample"].shape[2:]),
        "max_rel_error": float(np.max(np.abs(got - want))) / scale,
        "mean_rel_error": float(np.mean(np.abs(got - want))) / scale,
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # the unchanged graphs: no second copy of their weights on disk
    except OSError:
        shutil.copy2(src, dst)


def quantize_model(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    force: bool = False,
    report: Reporter | None = _print_stderr,
) -> Path:
    """Writes `out`: the model folder `folder` with an int8 UNet (MatMul and conv weights int8).

    Args:
        folder: an sdport model folder with an fp32 UNet (the default export).
        out: the folder to create; refused if it exists unless `force`.
        report: receives one line per stage; None for quiet.
    Returns:
        The path of the finished folder. Its manifest records precision "int8" for the UNet and,
        under parity["int8"], the UNet's output error against the fp32 graph.
    """
    report = report or (lambda _message: None)
    folder, out = Path(folder), Path(out)
    manifest = read_manifest(folder)
    spec = manifest.graphs[QUANTIZED]
    if spec.precision != "fp32":
        raise SdportError(
            f"{folder}: the unet is {spec.precision}; int8 quantization starts from an fp32 export "
            f"(export again without --fp16)"
        )
    if out.exists() and not force:
        raise SdportError(f"{out} already exists; choose another OUT or pass --force to replace it")
    started = time.perf_counter()
    remove_stale_siblings(out, report)
    tmp = temporary_sibling(out)
    try:
        unet_files = set(spec.sha256) | {spec.file} | ({spec.external_data} if spec.external_data else set())
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if path.is_file() and relative not in unet_files and relative != "sdport.json":
                _link_or_copy(path, tmp / relative)
        report(f"quantizing {QUANTIZED} (MatMul and conv weights int8)")
        final = tmp / spec.file
        quantize_unet(folder / spec.file, final)
        files = {f"{QUANTIZED}/{p.name}": file_sha256(p) for p in sorted(final.parent.iterdir())
                 if p.is_file() and p.name.startswith("model.onnx")}
        external = [f for f in files if not f.endswith(".onnx")]
        latent = 4 * manifest.latent_multiple
        error = unet_error(folder / spec.file, final, unet_feeds(manifest, latent))
        report(f"  {QUANTIZED}: int8 vs fp32 output error: max {error['max_rel_error']:.1e}, "
               f"mean {error['mean_rel_error']:.1e} of range")
        graphs = dict(manifest.graphs)
        graphs[QUANTIZED] = dataclasses.replace(
            spec, precision="int8", external_data=external[0] if external else None, sha256=files,
            parity={**spec.parity, "int8": error},
        )
        write_manifest(tmp, dataclasses.replace(manifest, graphs=graphs))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out
