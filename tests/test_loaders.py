"""Loading SOURCE for export: diffusers folders, original-layout single files, pickles, the hub.

The round trips go through diffusers' own single-file converter, so they prove that
`sdport.export.ldm_layout` writes the original CompVis/Stability key layout.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdport.errors import SdportError  # noqa: E402
from sdport.export.ldm_layout import ldm_names, to_ldm_state_dict, write_single_file  # noqa: E402
from sdport.export.loaders import (  # noqa: E402
    WIDTH_KEY,
    LoadedModel,
    detect_family,
    load_pipeline,
    read_safetensors_header,
)
from sdport.models.families import FAMILIES, family_for_embed_dim  # noqa: E402

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny(tiny_diffusers_dir: Path) -> LoadedModel:
    return load_pipeline(tiny_diffusers_dir, progress=False)


def assert_same_weights(a, b) -> None:
    for name in COMPONENTS:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}.{key}"


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def fake_checkpoint(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    """A header-only-sized checkpoint: float16 zeros of the given shapes (keep them small)."""
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in tensors.items()}, str(path))
    return path


# --- (a) diffusers folders -------------------------------------------------------------------


def test_diffusers_folder_loads_like_from_pretrained(tiny: LoadedModel, tiny_diffusers_dir: Path) -> None:
    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_diffusers_dir, safety_checker=None)
    assert tiny.source_kind == "diffusers"
    assert tiny.source == str(tiny_diffusers_dir.resolve())
    assert tiny.family == "custom"  # 32-wide text: neither SD 1.x nor 2.x
    assert tiny.pipeline.safety_checker is None
    assert all(p.dtype == torch.float32 for n in COMPONENTS for p in getattr(tiny.pipeline, n).parameters())
    assert not any(getattr(tiny.pipeline, n).training for n in COMPONENTS)
    assert_same_weights(tiny.pipeline, reference)


def test_prediction_type_override(tiny_diffusers_dir: Path) -> None:
    loaded = load_pipeline(tiny_diffusers_dir, prediction_type="v_prediction", family="sd1", progress=False)
    assert loaded.pipeline.scheduler.config.prediction_type == "v_prediction"
    assert type(loaded.pipeline.scheduler).__name__ == "PNDMScheduler"
    assert loaded.family == "sd1"
    with pytest.raises(SdportError, match="unknown prediction type"):
        load_pipeline(tiny_diffusers_dir, prediction_type="eps")


# --- (f) incomplete folders --------------------------------------------------------------------


@pytest.fixture()
def tiny_copy(tiny_diffusers_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_diffusers_dir, tmp_path / "copy"))


def test_folder_missing_component_is_named(tiny_copy: Path) -> None:
    shutil.rmtree(tiny_copy / "unet")
    with pytest.raises(SdportError, match=r"the unet component is missing \(no unet/ folder\)"):
        load_pipeline(tiny_copy, progress=False)


def test_folder_missing_weights_is_named(tiny_copy: Path) -> None:
    (tiny_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SdportError, match="the vae component has no weights"):
        load_pipeline(tiny_copy, progress=False)


def test_folder_with_pickled_weights_needs_opt_in(tiny_copy: Path) -> None:
    from safetensors.torch import load_file

    weights = tiny_copy / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), tiny_copy / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(SdportError, match="pytorch_model.bin is a pickled checkpoint"):
        load_pipeline(tiny_copy, progress=False)


def test_folder_of_another_pipeline_is_refused(tiny_copy: Path) -> None:
    index = json.loads((tiny_copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (tiny_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SdportError, match="StableDiffusionXLPipeline"):
        load_pipeline(tiny_copy, progress=False)


# --- (b) single files: the LDM layout round trip ------------------------------------------------


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_single_file_round_trip_is_exact(tiny: LoadedModel, tiny_diffusers_dir: Path, tmp_path: Path, layout) -> None:
    path = write_single_file(tiny.pipeline, tmp_path / "tiny.safetensors", text_layout=layout)
    names = read_safetensors_header(path)
    assert all(k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model") for k in names)
    text_prefix = "cond_stage_model.transformer.text_model." if layout == "clip" else "cond_stage_model.model."
    assert any(k.startswith(text_prefix) for k in names)
    loaded = load_pipeline(path, config=tiny_diffusers_dir, progress=False)
    assert loaded.source_kind == "single_file" and loaded.family == "custom"
    assert_same_weights(tiny.pipeline, loaded.pipeline)


def test_vae_attention_is_written_as_1x1_convolutions(tiny: LoadedModel) -> None:
    state = to_ldm_state_dict(tiny.pipeline)
    q = state["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert q.shape[2:] == (1, 1)
    assert state["first_stage_model.decoder.mid.attn_1.norm.weight"].ndim == 1


def test_incomplete_single_file_is_refused(tiny: LoadedModel, tiny_diffusers_dir: Path, tmp_path: Path) -> None:
    # diffusers loads single files with strict=False; a missing weight must not stay random silently
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in to_ldm_state_dict(tiny.pipeline).items()}
    del state["model.diffusion_model.out.2.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(SdportError, match=r"lacks 1 of .* model.diffusion_model.out.2.weight"):
        load_pipeline(tmp_path / "partial.safetensors", config=tiny_diffusers_dir, progress=False)


# --- (c) family detection -------------------------------------------------------------------------


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2"), (32, "custom")])
def test_family_detected_from_the_cross_attention_width(tmp_path: Path, width: int, family: str) -> None:
    path = fake_checkpoint(tmp_path / "fake.safetensors", {WIDTH_KEY: (320, width)})
    shapes = {k: v.shape for k, v in read_safetensors_header(path).items()}
    assert detect_family(shapes) == family
    assert family_for_embed_dim(width) == family


def test_unknown_width_without_config_is_refused(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path / "odd.safetensors", {WIDTH_KEY: (320, 32)})
    with pytest.raises(SdportError, match=r"could not tell which Stable Diffusion family.*--config"):
        load_pipeline(path, progress=False)


def test_family_that_contradicts_the_weights_is_refused(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path / "sd1.safetensors", {WIDTH_KEY: (320, 768)})
    with pytest.raises(SdportError, match="--family sd2 was given but its text width is 768"):
        load_pipeline(path, family="sd2", progress=False)


def test_inpainting_checkpoint_needs_its_own_config(tmp_path: Path) -> None:
    path = fake_checkpoint(
        tmp_path / "inpaint.safetensors",
        {WIDTH_KEY: (320, 768), "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)},
    )
    with pytest.raises(SdportError, match="9 input channels"):
        load_pipeline(path, progress=False)


def test_sdxl_and_partial_checkpoints_are_named(tmp_path: Path) -> None:
    sdxl = fake_checkpoint(tmp_path / "xl.safetensors", {"conditioner.embedders.0.x": (2,)})
    with pytest.raises(SdportError, match="SDXL"):
        load_pipeline(sdxl, progress=False)
    lora = fake_checkpoint(tmp_path / "lora.safetensors", {"lora_unet_down.alpha": (1,)})
    with pytest.raises(SdportError, match="no model.diffusion_model"):
        load_pipeline(lora, progress=False)


# --- (d) pickles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickles_are_refused_without_opt_in(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(SdportError) as info:
        load_pipeline(path, progress=False)
    assert str(info.value) == (
        f"{path} is a pickled checkpoint, which can run arbitrary code when loaded; convert it to "
        ".safetensors, or pass --allow-pickle if you trust its source"
    )


def test_pickle_loads_with_opt_in(tiny: LoadedModel, tiny_diffusers_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    # the original .ckpt files nest the weights under "state_dict", next to training state
    torch.save({"state_dict": to_ldm_state_dict(tiny.pipeline), "global_step": 1}, path)
    loaded = load_pipeline(path, allow_pickle=True, config=tiny_diffusers_dir, progress=False)
    assert loaded.source_kind == "single_file"
    assert_same_weights(tiny.pipeline, loaded.pipeline)


# --- (e) lying safetensors headers ------------------------------------------------------------------


def _header(**tensors) -> dict:
    return {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in tensors.items()}


@pytest.mark.parametrize(
    "header, data, message",
    [
        (_header(a=("F32", [4], [0, 16])), bytes(8), "past the end of the data section"),
        (_header(a=("F32", [2], [0, 8]), b=("F32", [2], [4, 12])), bytes(12), "overlaps the previous tensor"),
        (_header(a=("F32", [3], [0, 8])), bytes(8), r"F32 \(3,\) needs 12 bytes but its offsets span 8"),
        (_header(a=("F32", [2], [0, 8])), bytes(12), "truncated or padded"),
        (_header(a=("F32", [1], [4, 8])), bytes(8), "leaves a gap of 4 bytes"),
        (_header(a=("Q4", [2], [0, 1])), bytes(1), "unknown dtype 'Q4'"),
        (_header(a=("F32", [-1], [0, 0])), b"", "not a list of non-negative integers"),
    ],
)
def test_lying_header_is_refused(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = write_raw_safetensors(tmp_path / "lie.safetensors", header, data)
    with pytest.raises(SdportError, match=message):
        load_pipeline(path, progress=False)


def test_header_length_past_the_file_end_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(SdportError, match="header length"):
        read_safetensors_header(path)


def test_valid_header_is_read(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path / "ok.safetensors", {"a": (2, 3), "b": (5,)})
    header = read_safetensors_header(path)
    assert {k: (v.dtype, v.shape) for k, v in header.items()} == {"a": ("F16", (2, 3)), "b": ("F16", (5,))}


# --- other sources ---------------------------------------------------------------------------------


def test_missing_path_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(SdportError, match="not found"):
        load_pipeline(tmp_path / "nowhere", progress=False)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(SdportError, match="unknown checkpoint type '.gguf'"):
        load_pipeline(tmp_path / "model.gguf", progress=False)


def test_hub_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(SdportError, match=r"could not download 'someone/some-model' .*no network"):
        load_pipeline("someone/some-model", progress=False)
    assert calls[0][0] == "someone/some-model"
    assert calls[0][1]["dtype"] == torch.float32 and calls[0][1]["safety_checker"] is None


# --- (g) the shipped configs --------------------------------------------------------------------------


def _meta_pipeline(family: str) -> SimpleNamespace:
    """The family's unet, vae and text encoder from the shipped configs, without allocating weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    path = FAMILIES[family].config_path
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(diffusers.UNet2DConditionModel.load_config(path / "unet"))
        vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(path / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder"))
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder)


# Parameter counts of the real models (stable-diffusion-v1-5, stable-diffusion-2-1).
PARAMETERS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_shipped_configs_build_the_real_models(family: str) -> None:
    spec = FAMILIES[family]
    pipeline = _meta_pipeline(family)
    for name, count in PARAMETERS[family].items():
        assert sum(p.numel() for p in getattr(pipeline, name).parameters()) == count, name
    assert pipeline.unet.config.cross_attention_dim == spec.text_embed_dim
    assert pipeline.text_encoder.config.hidden_size == spec.text_embed_dim
    assert pipeline.unet.config.sample_size == spec.sample_size
    assert pipeline.vae.config.scaling_factor == spec.vae_scaling_factor
    scheduler = json.loads((spec.config_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == spec.default_prediction_type
    tokenizer = json.loads((spec.config_path / "tokenizer" / "special_tokens_map.json").read_text())
    assert tokenizer["pad_token"] == spec.pad_token
    assert not list(spec.config_path.rglob("vocab.json"))  # generated at load time


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_layout_matches_diffusers_converter(family: str) -> None:
    """Every real-size weight gets an LDM name and shape that diffusers' converter maps back to it."""
    from diffusers.loaders import single_file_utils as sfu

    pipeline = _meta_pipeline(family)
    checkpoint = to_ldm_state_dict(pipeline)  # meta tensors: names and shapes only
    assert checkpoint.keys() == ldm_names(pipeline).keys()
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(checkpoint, dict(pipeline.unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, dict(pipeline.vae.config)),
        "text_encoder": (
            sfu.convert_ldm_clip_checkpoint(checkpoint)
            if family == "sd1"
            else sfu.convert_open_clip_checkpoint(pipeline.text_encoder, checkpoint)
        ),
    }
    for name, state in converted.items():
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
        expected = getattr(pipeline, name).state_dict()
        assert state.keys() == expected.keys(), name
        assert all(state[k].shape == expected[k].shape for k in expected), name
    # the keys diffusers itself probes to recognise SD 1.x / 2.x checkpoints
    assert checkpoint[WIDTH_KEY].shape[-1] == FAMILIES[family].text_embed_dim
    assert sfu.CHECKPOINT_KEY_NAMES["v1"] in checkpoint
    assert sfu.CHECKPOINT_KEY_NAMES["clip" if family == "sd1" else "open_clip"] in checkpoint
    assert sfu.infer_diffusers_model_type(checkpoint) == {"sd1": "v1", "sd2": "v2"}[family]
