"""One short exporter per component: wrap the submodule we ship, trace it to ONNX, describe its I/O.

Graph names and I/O names follow optimum's Stable Diffusion export, so a folder made by either
tool runs in the other's runtime. Symbolic dims say their relation (`B`, `H`, `8H`).
"""

from __future__ import annotations

import contextlib
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sdport.models.manifest import CLIP_SKIP_OUTPUT, TensorSpec


@dataclass(frozen=True)
class ComponentGraph:
    """What the exporter needs to trace one component and what the manifest records about it."""

    name: str
    module: torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # (batch, latent height, latent width) -> example inputs; used to trace and to validate.
    make_inputs: Callable[[int, int, int, torch.Generator], tuple[torch.Tensor, ...]]
    # Inputs that classifier-free guidance gives the same value in both halves of the batch.
    guided_shared: tuple[str, ...] = ()


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=False)
        hidden_states = out[2]  # the embeddings, then each layer's output
        if len(hidden_states) < 3:  # one layer: nothing to skip to
            return out[0], out[1]
        # transformers 5 has it on the model; 4 on its text_model (where diffusers 0.42 looks)
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        skipped = [final_layer_norm(hidden_states[-(k + 1)]) for k in range(1, len(hidden_states) - 1)]
        return out[0], out[1], torch.stack(skipped, dim=1)  # manifest.CLIP_SKIP_OUTPUT: [B, layers - 1, T, D]


class _UNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        # Mean and log-variance, unclamped: the runtime clamps and samples as diffusers does.
        return self.vae.encode(sample, return_dict=False)[0].parameters


def component_graphs(pipeline) -> dict[str, ComponentGraph]:
    """The four graphs of an SD pipeline, in export order."""
    text_encoder, unet, vae = pipeline.text_encoder, pipeline.unet, pipeline.vae
    max_tokens = text_encoder.config.max_position_embeddings
    layers = text_encoder.config.num_hidden_layers
    vocab = text_encoder.config.vocab_size
    embed_dim = text_encoder.config.hidden_size
    latent_channels = unet.config.in_channels
    vae_channels = vae.config.latent_channels
    scale = 2 ** (len(vae.config.block_out_channels) - 1)

    def text_inputs(batch, _h, _w, gen):
        return (torch.randint(0, vocab, (batch, max_tokens), generator=gen, dtype=torch.int64),)

    def unet_inputs(batch, h, w, gen):
        latents = torch.randn(batch, latent_channels, h, w, generator=gen)
        if batch % 2 == 0:  # as guidance runs it: the same latents for both halves
            latents[batch // 2:] = latents[:batch // 2]
        return (
            latents,
            torch.tensor(float(torch.randint(0, 1000, (1,), generator=gen)), dtype=torch.float32),
            torch.randn(batch, max_tokens, embed_dim, generator=gen),
        )

    def decoder_inputs(batch, h, w, gen):
        return (torch.randn(batch, vae_channels, h, w, generator=gen),)

    def encoder_inputs(batch, h, w, gen):
        return (torch.rand(batch, 3, h * scale, w * scale, generator=gen) * 2 - 1,)

    return {
        "text_encoder": ComponentGraph(
            "text_encoder",
            _TextEncoder(text_encoder),
            (TensorSpec("input_ids", "int64", ("B", max_tokens)),),
            (
                TensorSpec("last_hidden_state", "float32", ("B", max_tokens, embed_dim)),
                TensorSpec("pooler_output", "float32", ("B", embed_dim)),
                *([TensorSpec(CLIP_SKIP_OUTPUT, "float32", ("B", layers - 1, max_tokens, embed_dim))] if layers > 1 else []),
            ),
            text_inputs,
        ),
        "unet": ComponentGraph(
            "unet",
            _UNet(unet),
            (
                TensorSpec("sample", "float32", ("B", latent_channels, "H", "W")),
                TensorSpec("timestep", "float32", ()),
                TensorSpec("encoder_hidden_states", "float32", ("B", max_tokens, embed_dim)),
            ),
            (TensorSpec("out_sample", "float32", ("B", unet.config.out_channels, "H", "W")),),
            unet_inputs,
            guided_shared=("sample", "timestep"),
        ),
        "vae_decoder": ComponentGraph(
            "vae_decoder",
            _VaeDecoder(vae),
            (TensorSpec("latent_sample", "float32", ("B", vae_channels, "H", "W")),),
            (TensorSpec("sample", "float32", ("B", 3, f"{scale}H", f"{scale}W")),),
            decoder_inputs,
        ),
        "vae_encoder": ComponentGraph(
            "vae_encoder",
            _VaeEncoder(vae),
            (TensorSpec("sample", "float32", ("B", 3, f"{scale}H", f"{scale}W")),),
            (TensorSpec("latent_parameters", "float32", ("B", 2 * vae_channels, "H", "W")),),
            encoder_inputs,
        ),
    }


def _dynamic_axes(specs: tuple[TensorSpec, ...]) -> dict[str, dict[int, str]]:
    return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}


def _geglu_as_two_products(self, hidden_states, *args, **kwargs):
    """GEGLU (`h, gate = proj(x).chunk(2); h * gelu(gate)`) with `proj` as two half products.

    The same arithmetic; the trace then has no Slice copies of the doubled-width product, and
    onnxruntime fuses the gate's bias into its Gelu (BiasGelu). SD 1.5 at 512 px, 2 cores:
    the 16 feed-forward layers' Slices took 0.09 s of a 7.7 s step."""
    weight_h, weight_gate = self.proj.weight.chunk(2, dim=0)
    bias_h, bias_gate = self.proj.bias.chunk(2) if self.proj.bias is not None else (None, None)
    hidden = torch.nn.functional.linear(hidden_states, weight_h, bias_h)
    gate = torch.nn.functional.linear(hidden_states, weight_gate, bias_gate)
    return hidden * self.gelu(gate)


@contextlib.contextmanager
def _traceable(module: torch.nn.Module):
    """`module` with the forms that trace into faster graphs, for the length of the trace only
    (the reference outputs come from the model as loaded)."""
    from diffusers.models.activations import GEGLU

    patched = [m for m in module.modules() if isinstance(m, GEGLU)]
    for geglu in patched:
        geglu.forward = types.MethodType(_geglu_as_two_products, geglu)
    try:
        yield module
    finally:
        for geglu in patched:
            del geglu.forward  # back to the class's own


def trace_to_onnx(graph: ComponentGraph, path: Path, *, opset: int, trace_size: tuple[int, int]) -> Path:
    """Traces `graph` with the TorchScript exporter (fast, ~1e-6 parity) into `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Batch 2 (not 1) at a size well above the smallest, so that no dim is specialised to 1.
    example = graph.make_inputs(2, *trace_size, torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings(), _traceable(graph.module.eval()) as module:
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[s.name for s in graph.inputs],
            output_names=[s.name for s in graph.outputs],
            dynamic_axes=_dynamic_axes(graph.inputs + graph.outputs),
        )
    return path
