"""A tiny, randomly initialised SD 1.x pipeline in diffusers' folder format, for tests and demos.

Built with the real classes (transformers' CLIPTextModel, diffusers' UNet2DConditionModel and
AutoencoderKL) and the real CLIP vocabulary, so every code path of export and runtime runs on it
in seconds. Its topology mirrors SD 1.x (cross-attention UNet, 8x VAE) at toy widths.
"""

from __future__ import annotations

from pathlib import Path

from sdport.export.clip_vocab import BOS, EOS, clip_vocab_and_merges
from sdport.models.families import scheduler_config

TINY_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)

# Four blocks: three 2x down-samplings, the 8x of SD's VAE.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)


def build_tiny_pipeline(seed: int = 0):
    """Returns a diffusers StableDiffusionPipeline with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split()) for m in merges], bos_token=BOS, eos_token=EOS,
        unk_token=EOS, pad_token=EOS, model_max_length=77,
    )
    scheduler = PNDMScheduler.from_config(scheduler_config("sd1"))  # SD 1.x's own
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_tiny_model(out: Path, seed: int = 0, progress: bool = True) -> Path:
    """Writes the tiny pipeline as a diffusers folder (safetensors weights) at `out`; without
    `progress`, transformers' "Writing model shards" bar is not shown."""
    from sdport.export.loaders import quiet_libraries

    out = Path(out)
    pipeline = build_tiny_pipeline(seed)
    with quiet_libraries(progress):
        pipeline.save_pretrained(out, safe_serialization=True)
    return out
