"""The Stable Diffusion families sdport knows, as data: what export and runtime need to know.

Stdlib only. Each family names a folder under `sdport/models/configs/` holding diffusers'
component configs for it, so that a single-file checkpoint loads without fetching them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
CUSTOM = "custom"  # a model whose text width matches no known family (the tiny test model, ...)


@dataclass(frozen=True)
class FamilySpec:
    """The facts of one model family; no code elsewhere branches on a family name."""

    name: str  # key of FAMILIES, also the folder under configs/
    description: str
    text_encoder: str  # which text encoder the family conditions on
    text_embed_dim: int  # width of the text encoder's hidden states = UNet cross-attention width
    vae_scaling_factor: float  # latents = vae.encode(x).mean * this
    default_prediction_type: str  # epsilon | v_prediction; a user may override it
    sample_size: int  # the UNet's native latent size: image size / 8
    pad_token: str  # the tokenizer's padding token
    config_dir: str  # folder under CONFIGS_DIR, in diffusers' layout (no vocab files)

    @property
    def config_path(self) -> Path:
        return CONFIGS_DIR / self.config_dir


FAMILIES: dict[str, FamilySpec] = {
    "sd1": FamilySpec(
        name="sd1",
        description="Stable Diffusion 1.x (configs of stable-diffusion-v1-5)",
        text_encoder="CLIP ViT-L/14 (OpenAI)",
        text_embed_dim=768,
        vae_scaling_factor=0.18215,
        default_prediction_type="epsilon",
        sample_size=64,  # 512 px
        pad_token="<|endoftext|>",
        config_dir="sd1",
    ),
    "sd2": FamilySpec(
        name="sd2",
        description="Stable Diffusion 2.x (configs of stabilityai/stable-diffusion-2-1)",
        text_encoder="OpenCLIP ViT-H/14 (LAION), penultimate layer",
        text_embed_dim=1024,
        vae_scaling_factor=0.18215,
        # The 768-px 2.0/2.1 models are v-prediction; the 512-px "-base" ones are epsilon and
        # nothing in their weights says so: the user overrides it (`prediction_type="epsilon"`).
        default_prediction_type="v_prediction",
        sample_size=96,  # 768 px
        pad_token="!",  # OpenCLIP pads with id 0, which is "!"
        config_dir="sd2",
    ),
}


def family_for_embed_dim(dim: int) -> str:
    """Returns the family whose text width is `dim` ("sd1", "sd2"), or "custom"."""
    for spec in FAMILIES.values():
        if spec.text_embed_dim == dim:
            return spec.name
    return CUSTOM


def scheduler_config(family: str) -> dict:
    """The family's shipped diffusers scheduler config (SD 1.x: PNDM with skip_prk_steps)."""
    path = FAMILIES[family].config_path / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text(encoding="utf-8"))
