"""An SD 1.5-sized pipeline with random weights: the real v1-5 component configs, 860M-parameter UNet.

Built once and cached outside the repository (~/.cache/sdport/sd15-random, or $SDPORT_CACHE);
benchmarks and the README's export measurements use it. Random weights say nothing about image
quality, everything about time and memory.

    python benchmarks/sd15_model.py            # prints the folder
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdport.cache import cache_root
from sdport.export.clip_vocab import BOS, EOS, clip_vocab_and_merges
from sdport.models.families import FAMILIES


def sd15_random_dir() -> Path:
    return cache_root() / "sd15-random"


def build_sd15_random(out: Path | None = None, seed: int = 0) -> Path:
    """Writes (once) and returns a diffusers folder of an SD 1.5-sized pipeline with random weights."""
    out = Path(out or sd15_random_dir())
    if (out / "model_index.json").exists():
        return out
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    configs = FAMILIES["sd1"].config_path
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(configs / "text_encoder" / "config.json")))
    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], bos_token=BOS,
                              eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=77)
    scheduler = PNDMScheduler.from_pretrained(configs / "scheduler")
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".partial")
    pipeline.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build_sd15_random(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
