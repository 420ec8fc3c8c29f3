"""Diffusers -> original (CompVis / Stability "LDM") checkpoint layout: the single-file format.

The reverse of diffusers' `from_single_file` conversion, key by key:

    unet          -> model.diffusion_model.*
    vae           -> first_stage_model.*
    text_encoder  -> cond_stage_model.transformer.text_model.*   (SD 1.x, OpenAI CLIP)
                  or cond_stage_model.model.*                     (SD 2.x, OpenCLIP)

Each `*_key` function maps one diffusers parameter name to its LDM name, so the same tables
serve writing a checkpoint and checking that a checkpoint holds every weight a model needs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

TextLayout = Literal["clip", "open_clip"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# Parameters outside the down/mid/up blocks.
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a UNet ResBlock (LDM wraps them in Sequentials, hence the indices).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


class LayoutError(ValueError):
    """A diffusers parameter has no place in the LDM layout (a model SD 1.x/2.x never had)."""


def _split(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, param = key.rpartition(".")
    return module, param


def unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """Maps one diffusers UNet2DConditionModel parameter name to its LDM name."""
    module, param = _split(key)
    if module in UNET_TOP_LEVEL:
        return f"{UNET_TOP_LEVEL[module]}.{param}"
    n = layers_per_block + 1  # LDM numbers blocks flat: each level has n entries (+ a resampler)

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        if head not in UNET_RESNET:
            raise LayoutError(f"unet parameter {key!r} has no SD 1.x/2.x (LDM) equivalent")
        return f"{UNET_RESNET[head]}.{tail}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{n * i + j + 1}.0.{resnet(rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{n * i + j + 1}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{n * i + j}.0.{resnet(rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{n * i + j}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        i = int(m[1])
        # the upsampler follows the last ResBlock (and its attention, where the level has one)
        slot = 2 if up_has_attention[i] else 1
        return f"output_blocks.{n * i + layers_per_block}.{slot}.conv.{m[2]}"
    raise LayoutError(f"unet parameter {key!r} has no SD 1.x/2.x (LDM) equivalent")


def vae_key(key: str, num_blocks: int) -> str:
    """Maps one diffusers AutoencoderKL parameter name to its LDM name."""
    module, param = _split(key)
    if module in VAE_TOP_LEVEL:
        return f"{VAE_TOP_LEVEL[module]}.{param}"

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # LDM numbers decoder levels from the lowest resolution up; diffusers from the top down
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
        if m[2] in VAE_ATTENTION:
            return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    raise LayoutError(f"vae parameter {key!r} has no SD 1.x/2.x (LDM) equivalent")


def clip_key(key: str) -> str:
    """Maps one transformers CLIPTextModel parameter name to the SD 1.x checkpoint's name."""
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; checkpoints keep it
    if key.startswith("text_projection"):
        raise LayoutError(f"text_encoder parameter {key!r}: SD 1.x's text encoder has no projection")
    return key if key.startswith("text_model.") else f"text_model.{key}"


def open_clip_key(key: str) -> str:
    """Maps one CLIPTextModel parameter name to SD 2.x's OpenCLIP name (q/k/v share in_proj)."""
    key = key.removeprefix("text_model.")
    if key in OPEN_CLIP_TOP_LEVEL:
        return OPEN_CLIP_TOP_LEVEL[key]
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)", key):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        if m[2] in OPEN_CLIP_LAYER:
            return f"transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"
    raise LayoutError(f"text_encoder parameter {key!r} has no OpenCLIP equivalent")


def default_text_layout(pipeline: Any) -> TextLayout:
    """SD 2.x's 1024-wide text encoder is OpenCLIP; everything else is written as OpenAI CLIP."""
    return "open_clip" if pipeline.text_encoder.config.hidden_size == 1024 else "clip"


def _unet_args(unet: Any) -> tuple[int, list[bool]]:
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise LayoutError(f"unet: layers_per_block {layers!r} per level has no LDM layout (SD uses one int)")
    return layers, ["CrossAttn" in t for t in unet.config.up_block_types]


def ldm_names(pipeline: Any, text_layout: TextLayout | None = None) -> dict[str, str]:
    """LDM name -> diffusers name (`component.param`) for every weight of the pipeline."""
    layout = text_layout or default_text_layout(pipeline)
    layers, up_attention = _unet_args(pipeline.unet)
    vae_blocks = len(pipeline.vae.config.block_out_channels)
    names: dict[str, str] = {}
    for key in pipeline.unet.state_dict():
        names[UNET_PREFIX + unet_key(key, layers, up_attention)] = f"unet.{key}"
    for key in pipeline.vae.state_dict():
        names[VAE_PREFIX + vae_key(key, vae_blocks)] = f"vae.{key}"
    for key in pipeline.text_encoder.state_dict():
        if layout == "clip":
            names[CLIP_PREFIX + clip_key(key)] = f"text_encoder.{key}"
        else:
            names[OPEN_CLIP_PREFIX + open_clip_key(key)] = f"text_encoder.{key}"
    return names


def to_ldm_state_dict(pipeline: Any, text_layout: TextLayout | None = None) -> dict[str, torch.Tensor]:
    """Returns the pipeline's unet, vae and text_encoder weights under their original LDM names.

    `text_layout` is "clip" (SD 1.x: `cond_stage_model.transformer.text_model.*`) or
    "open_clip" (SD 2.x: `cond_stage_model.model.*`); by default, OpenCLIP for 1024-wide text
    encoders. The tensors share memory with the pipeline where the layouts agree.
    """
    import torch

    layout = text_layout or default_text_layout(pipeline)
    out: dict[str, torch.Tensor] = {}
    layers, up_attention = _unet_args(pipeline.unet)
    for key, value in pipeline.unet.state_dict().items():
        out[UNET_PREFIX + unet_key(key, layers, up_attention)] = value
    vae_blocks = len(pipeline.vae.config.block_out_channels)
    for key, value in pipeline.vae.state_dict().items():
        name = vae_key(key, vae_blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and ".norm." not in name:
            value = value.reshape(*value.shape, 1, 1)  # LDM's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + name] = value
    text = pipeline.text_encoder.state_dict()
    if layout == "clip":
        for key, value in text.items():
            out[CLIP_PREFIX + clip_key(key)] = value
        return out
    in_proj: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in text.items():
        name = OPEN_CLIP_PREFIX + open_clip_key(key)
        if ".attn.in_proj_" in name:
            in_proj.setdefault(name, {})[key.rsplit(".", 2)[-2][0]] = value  # 'q' | 'k' | 'v'
        else:
            out[name] = value
    for name, parts in in_proj.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # OpenCLIP packs q, k, v
    return out


def write_single_file(pipeline: Any, path: str | os.PathLike, text_layout: TextLayout | None = None) -> Path:
    """Saves the pipeline as one original-layout `.safetensors` checkpoint at `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in to_ldm_state_dict(pipeline, text_layout).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path
