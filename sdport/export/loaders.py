"""Loads the model to export: a diffusers folder, a single-file checkpoint, or a hub repository.

All three end in diffusers' own loaders (`StableDiffusionPipeline.from_pretrained` and
`from_single_file`); this module only decides which, supplies the configs a single file lacks
(shipped in `sdport/models/configs/`, so no network is needed), and checks what it is handed
before torch reads it: pickles are refused unless trusted, safetensors headers are validated,
missing components and missing weights are named.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdport.errors import SdportError, UsageError, typed_first_line
from sdport.models.families import CUSTOM, FAMILIES, family_for_embed_dim

SourceKind = Literal["diffusers", "single_file", "hub"]

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' own probe: the width of the first cross-attention's key projection is the text width.
WIDTH_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
IN_CHANNELS_KEY = "model.diffusion_model.input_blocks.0.0.weight"
OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_COMPONENTS = ("unet", "vae", "text_encoder")
SAFE_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "model.safetensors.index.json",
)
PICKLED_WEIGHTS = (
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded pipeline and where it came from."""

    pipeline: Any  # diffusers StableDiffusionPipeline, float32, eval mode, no safety checker
    family: str  # a key of sdport.models.families.FAMILIES, or "custom"
    source_kind: SourceKind
    source: str  # absolute path, or the hub id


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # [begin, end) in the data section


def load_pipeline(
    source: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    config: str | os.PathLike | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Loads a Stable Diffusion 1.x/2.x pipeline from `source` for export.

    `source` is a diffusers folder (with model_index.json), a single-file checkpoint in the
    original SD layout (`.safetensors`; pickled `.ckpt/.bin/.pt/.pth` only with
    `allow_pickle=True`), or a Hugging Face Hub id `owner/name` (needs a network).
    For a single file, `config` is a diffusers folder whose component configs match the
    checkpoint; by default the shipped configs of its family are used, the family being
    detected from the weights or given as `family` ("sd1", "sd2"). `prediction_type`
    ("epsilon", "v_prediction", "sample") overrides the scheduler's (SD 2.x "-base" models are
    epsilon). `progress=False` silences diffusers' and transformers' bars and warnings.
    Raises SdportError with a message that says what is wrong and how to fix it.
    """
    if family is not None and family not in FAMILIES and family != CUSTOM:
        raise UsageError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    path = Path(source).expanduser()
    with quiet_libraries(progress):
        if path.is_dir():
            if config is not None:
                raise UsageError(f"{path}: --config applies to single-file checkpoints, not to diffusers folders")
            pipeline = _load_diffusers_folder(path, allow_pickle)
            kind: SourceKind = "diffusers"
            where = str(path.resolve())
        elif path.is_file():
            pipeline, detected = _load_single_file(path, allow_pickle, config, family)
            family = family or detected
            kind, where = "single_file", str(path.resolve())
        elif HUB_ID.fullmatch(str(source)):
            pipeline = _load_hub(str(source), allow_pickle)
            kind, where = "hub", str(source)
        else:
            raise SdportError(
                f"{source}: not found (SOURCE is a diffusers folder, a .safetensors checkpoint, "
                "or a Hugging Face Hub id like owner/name)"
            )
        if prediction_type is not None:
            scheduler = pipeline.scheduler
            pipeline.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
        pipeline.set_progress_bar_config(disable=not progress)
    for name in MODEL_COMPONENTS:
        getattr(pipeline, name).eval()
    family = family or family_for_embed_dim(int(pipeline.unet.config.cross_attention_dim))
    return LoadedModel(pipeline=pipeline, family=family, source_kind=kind, source=where)


# --- diffusers folders and hub repositories ---------------------------------------------------


def _check_diffusers_folder(folder: Path, allow_pickle: bool) -> None:
    """Names the first missing or unsafe component instead of letting diffusers trip on it."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise SdportError(
            f"{folder}: no model_index.json, so not a diffusers folder (SOURCE is a diffusers folder, "
            "a .safetensors checkpoint or a hub id)"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdportError(f"{index_path}: not valid JSON ({exc})") from exc
    if not isinstance(index, dict):
        raise SdportError(f"{index_path}: expected a JSON object")
    pipeline_class = index.get("_class_name")
    if pipeline_class not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        raise SdportError(
            f"{index_path}: a {pipeline_class} folder; sdport exports Stable Diffusion 1.x/2.x "
            "text-to-image models (StableDiffusionPipeline)"
        )
    for name in REQUIRED_COMPONENTS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            needs = ", ".join(REQUIRED_COMPONENTS)
            raise SdportError(f"{index_path}: lists no {name}; a Stable Diffusion pipeline needs {needs}")
        sub = folder / name
        if not sub.is_dir():
            raise SdportError(f"{folder}: the {name} component is missing (no {name}/ folder)")
        if name == "scheduler":
            needed = ["scheduler_config.json"]
        elif name == "tokenizer":
            needed = [] if (sub / "tokenizer.json").is_file() else ["vocab.json", "merges.txt"]
        else:
            needed = ["config.json"]
        for file in needed:
            if not (sub / file).is_file():
                raise SdportError(f"{folder}: the {name} component is incomplete: {name}/{file} is missing")
        if name not in MODEL_COMPONENTS:
            continue
        if any((sub / f).is_file() for f in SAFE_WEIGHTS):
            continue
        pickled = [f for f in PICKLED_WEIGHTS if (sub / f).is_file()]
        if not pickled:
            expected = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
            raise SdportError(f"{folder}: the {name} component has no weights (expected {name}/{expected})")
        if not allow_pickle:
            raise SdportError(_pickle_message(sub / pickled[0]))


def _load_diffusers_folder(folder: Path, allow_pickle: bool) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline

    _check_diffusers_folder(folder, allow_pickle)
    try:
        return StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, use_safetensors=None if allow_pickle else True, **_pipeline_kwargs(torch)
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise SdportError(f"{folder}: diffusers could not load this folder: {typed_first_line(exc)}") from exc


def _load_hub(repo_id: str, allow_pickle: bool) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            repo_id, use_safetensors=None if allow_pickle else True, **_pipeline_kwargs(torch)
        )
    except Exception as exc:  # network, auth, missing repository or files: all end here
        raise SdportError(
            f"could not download {repo_id!r} from the Hugging Face Hub (no network? a gated model "
            f"needs `hf auth login`; if it is a local path, it does not exist): {typed_first_line(exc)}"
        ) from exc


def _pipeline_kwargs(torch: Any) -> dict[str, Any]:
    # float32: export traces in fp32 and converts precision itself; no safety checker is exported
    return dict(dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# --- single-file checkpoints --------------------------------------------------------------------


def _pickle_message(path: Path) -> str:
    return (
        f"{path} is a pickled checkpoint, which can run arbitrary code when loaded; convert it to "
        ".safetensors, or pass --allow-pickle if you trust its source"
    )


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Reads and validates a .safetensors header without reading the tensors.

    The format: an 8-byte little-endian header length n, n bytes of JSON mapping each tensor
    name to {dtype, shape, data_offsets}, then the data section, which the tensors must tile
    exactly. Anything else raises SdportError naming the file and the offending tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SdportError(f"{path}: too short to be a .safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SdportError(
                f"{path}: not a valid .safetensors file (header length {n} does not fit in {size} bytes); "
                "is it a pickled checkpoint renamed, or truncated?"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SdportError(f"{path}: the .safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SdportError(f"{path}: the .safetensors header is not a JSON object")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_size)
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: item[1].offsets):
        begin, end = info.offsets
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise SdportError(f"{path}: tensor {name!r} {what} (offset {begin}, expected {position}); the header lies")
        position = end
    if position != data_size:
        raise SdportError(
            f"{path}: the header describes {position} bytes of tensor data but the file holds {data_size}; "
            "the file is truncated or padded"
        )
    return tensors


def _tensor_info(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SdportError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SdportError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise SdportError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise SdportError(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise SdportError(f"{where}: data ends at byte {end}, past the end of the data section ({data_size} bytes)")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise SdportError(f"{where}: {dtype} {tuple(shape)} needs {nbytes} bytes but its offsets span {end - begin}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), offsets=(begin, end))


def _read_pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap needs the zip format; old checkpoints are plain pickles
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise SdportError(
            f"{path}: could not read it as a PyTorch checkpoint of tensors: {typed_first_line(exc)}"
        ) from exc
    while isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoints nest it
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SdportError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The family of an original-layout checkpoint, from its tensor shapes; None if unknown."""
    width = shapes.get(WIDTH_KEY)
    return None if not width else family_for_embed_dim(width[-1])


def _check_layout(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuses checkpoints that are not SD 1.x/2.x in the original layout, saying what they are."""
    if any(k.startswith("conditioner.") for k in shapes):
        raise SdportError(f"{path}: an SDXL checkpoint (conditioner.* keys); sdport exports SD 1.x/2.x models")
    if not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise SdportError(
            f"{path}: no model.diffusion_model.* weights, so not a full SD checkpoint in the original layout "
            "(a LoRA, a VAE or a single diffusers component?); pass a full checkpoint or a diffusers folder"
        )


def _load_single_file(
    path: Path, allow_pickle: bool, config: str | os.PathLike | None, family: str | None
) -> tuple[Any, str | None]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise SdportError(_pickle_message(path))
        shapes = _read_pickle_shapes(path)
    elif suffix == ".safetensors":
        shapes = {name: info.shape for name, info in read_safetensors_header(path).items()}
    else:
        raise SdportError(
            f"{path}: unknown checkpoint type {suffix or '(no suffix)'!r}; SOURCE is a diffusers folder, "
            "a .safetensors checkpoint or a hub id"
        )
    _check_layout(path, shapes)
    detected = detect_family(shapes)
    if family is not None and detected is not None and family != detected and family != CUSTOM:
        width = shapes[WIDTH_KEY][-1]
        raise SdportError(
            f"{path}: --family {family} was given but its text width is {width} "
            f"(a {detected} checkpoint); leave --family out to use the detected one"
        )
    if config is not None:
        config_dir = Path(config).expanduser()
        if not (config_dir / "model_index.json").is_file():
            raise SdportError(
                f"{config_dir}: --config must be a diffusers folder (with model_index.json and the "
                "component configs) matching the checkpoint"
            )
        return _from_single_file(path, config_dir, shapes, f"the configs in {config_dir}"), family
    chosen = family or detected
    if chosen not in FAMILIES:
        width = shapes.get(WIDTH_KEY, (None,))[-1]
        raise SdportError(
            f"{path}: could not tell which Stable Diffusion family this is (text width {width}; "
            f"sdport ships configs for {', '.join(f'{s.name} ({s.text_embed_dim})' for s in FAMILIES.values())}); "
            "pass --family, or --config with a diffusers folder whose configs match the checkpoint"
        )
    in_channels = shapes.get(IN_CHANNELS_KEY, (0, 4))[1]
    if in_channels != 4:
        raise SdportError(
            f"{path}: its UNet takes {in_channels} input channels (an inpainting or instruct-pix2pix model?), "
            "not the 4 of the shipped text-to-image configs; pass --config with a diffusers folder that matches it"
        )
    spec = FAMILIES[chosen]
    with tempfile.TemporaryDirectory(prefix="sdport-config-") as tmp:
        config_dir = Path(tmp) / spec.name
        shutil.copytree(spec.config_path, config_dir)
        from sdport.export.clip_vocab import write_vocab_files

        write_vocab_files(config_dir / "tokenizer")  # SD 1.x and 2.x tokenizers share CLIP's BPE
        pipeline = _from_single_file(path, config_dir, shapes, f"sdport's {spec.name} configs")
    return pipeline, chosen


def _from_single_file(path: Path, config_dir: Path, shapes: Mapping[str, tuple[int, ...]], configs: str) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline

    # Before loading: diffusers' low-memory loader (with accelerate) fails on a missing weight
    # with an unhelpful meta-tensor error, and without it a missing weight would stay random.
    _check_complete(path, _empty_pipeline(config_dir), shapes)
    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, **_pipeline_kwargs(torch)
        )
    except Exception as exc:  # diffusers raises ValueError, OSError, RuntimeError (size mismatch), its own
        raise SdportError(
            f"{path}: diffusers could not build a pipeline from it with {configs}: {typed_first_line(exc)}; "
            "if it is not a plain SD 1.x/2.x model, pass --config with a diffusers folder that matches it"
        ) from exc
    return pipeline


def _empty_pipeline(config_dir: Path) -> Any:
    """unet, vae and text_encoder from `config_dir`'s configs on the meta device (no memory)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        with init_empty_weights():
            return SimpleNamespace(
                unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
                vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
                text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")),
            )
    except Exception as exc:  # missing or invalid config files
        raise SdportError(f"{config_dir}: its component configs cannot be read: {typed_first_line(exc)}") from exc


def _check_complete(path: Path, pipeline: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """diffusers loads single files with strict=False: a missing weight would stay random. Not here."""
    from sdport.export.ldm_layout import LayoutError, ldm_names

    layout = "open_clip" if OPEN_CLIP_KEY in shapes else "clip"
    try:
        names = ldm_names(pipeline, layout)
    except LayoutError:
        return  # a model the LDM layout cannot describe: nothing to compare against
    missing = [name for name in names if name not in shapes]
    if missing:
        raise SdportError(
            f"{path}: the checkpoint lacks {len(missing)} of the {len(names)} weights the model needs "
            f"(e.g. {', '.join(missing[:3])}); it is incomplete or its configs do not match it"
        )


# --- helpers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_libraries(progress: bool) -> Iterator[None]:
    """With progress=False, silences diffusers', transformers' and the hub's bars and warnings."""
    if progress:
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    saved = (
        diffusers_logging.get_verbosity(),
        transformers_logging.get_verbosity(),
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
        hub_utils.are_progress_bars_disabled(),
    )
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])
        if saved[2]:
            diffusers_logging.enable_progress_bar()
        if saved[3]:
            transformers_logging.enable_progress_bar()
        if not saved[4]:
            hub_utils.enable_progress_bars()
