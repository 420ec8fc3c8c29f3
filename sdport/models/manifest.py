"""The exported-folder manifest (`sdport.json`): the contract between export and runtime.

Stdlib only, so that export, the runtime and hosts in other languages read the same facts.
A folder written by optimum's exporter has no manifest; `read_manifest` then derives one from
`model_index.json` and the component configs, leaving graph I/O to be read from the graphs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdport.errors import SdportError

MANIFEST_FILE = "sdport.json"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")


class ManifestError(SdportError, ValueError):
    """A model folder or its manifest is unusable; the message says what, where and how to fix."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Symbolic dims are strings that say their relation (`B`, `8H`)."""

    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, int32
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the folder."""

    file: str  # relative to the folder, forward slashes
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    opset: int | None = None
    precision: str = "fp32"  # fp32 | fp16 (fp16 weights, fp32 I/O)
    optimization: str = "none"  # none | portable (standard ops) | ort (onnxruntime contrib ops)
    external_data: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)  # file -> hex digest
    parity: dict[str, Any] = field(default_factory=dict)  # errors measured against PyTorch at export


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an exported model folder."""

    family: str  # a key of sdport.models.families.FAMILIES, "custom", or "unknown" (optimum folder)
    prediction_type: str  # epsilon | v_prediction | sample
    vae_scaling_factor: float
    latent_channels: int
    vae_scale: int  # pixels per latent cell (8 for SD)
    latent_multiple: int  # latent height/width must be multiples of this (UNet down-sampling)
    text_embed_dim: int
    max_tokens: int
    graphs: dict[str, GraphSpec]
    tokenizer_dir: str = "tokenizer"
    scheduler_config: str = "scheduler/scheduler_config.json"
    sample_size: int | None = None  # the UNet's native latent size (64 for SD 1.5 at 512 px)
    tools: dict[str, str] = field(default_factory=dict)
    source: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def default_image_size(self) -> int:
        return (self.sample_size or 64) * self.vae_scale


def tensor_spec_to_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}


def manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    data = dataclasses.asdict(manifest)
    data["format"] = "sdport"
    for graph in data["graphs"].values():
        for key in ("inputs", "outputs"):
            graph[key] = [dict(t, shape=list(t["shape"])) for t in graph[key]]
    return data


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest_to_json(manifest), indent=2) + "\n", encoding="utf-8")
    return path


def _tensor_specs(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list):
        raise ManifestError(f"{where}: expected a list of tensors")
    specs = []
    for item in items:
        try:
            specs.append(TensorSpec(str(item["name"]), str(item["dtype"]), tuple(item["shape"])))
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where}: tensor entry {item!r} lacks name/dtype/shape") from exc
    return tuple(specs)


def _graph_spec(data: Any, where: str) -> GraphSpec:
    if not isinstance(data, dict) or not isinstance(data.get("file"), str):
        raise ManifestError(f"{where}: expected an object with a 'file' string")
    known = {f.name for f in dataclasses.fields(GraphSpec)}
    values = {k: v for k, v in data.items() if k in known}
    values["inputs"] = _tensor_specs(data.get("inputs", []), f"{where}.inputs")
    values["outputs"] = _tensor_specs(data.get("outputs", []), f"{where}.outputs")
    return GraphSpec(**values)


def manifest_from_json(data: Any, where: str = MANIFEST_FILE) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != "sdport":
        raise ManifestError(f"{where}: not an sdport manifest (no \"format\": \"sdport\")")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: format_version {version!r} is not supported (this sdport reads "
            f"{FORMAT_VERSION}); re-export the model with this version of sdport"
        )
    graphs = data.get("graphs")
    if not isinstance(graphs, dict):
        raise ManifestError(f"{where}: 'graphs' must be an object")
    known = {f.name for f in dataclasses.fields(Manifest)}
    values = {k: v for k, v in data.items() if k in known}
    values["graphs"] = {name: _graph_spec(g, f"{where}: graphs.{name}") for name, g in graphs.items()}
    try:
        return Manifest(**values)
    except TypeError as exc:
        raise ManifestError(f"{where}: {exc}") from exc


def read_json(path: Path) -> Any:
    """Reads a JSON file, turning every failure into a ManifestError that names the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc


def inside(folder: Path, relative: str) -> Path:
    """Resolves `relative` under `folder`, refusing anything (`..`, absolute, symlinks) that leaves it."""
    root = Path(folder).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise ManifestError(f"{relative!r} points outside the model folder {root}; refusing to read it")
    return target


def _diffusers_manifest(folder: Path) -> Manifest:
    """Derives a manifest from an optimum-style folder (model_index.json + component configs)."""
    index = read_json(folder / "model_index.json")
    if not isinstance(index, dict):
        raise ManifestError(f"{folder / 'model_index.json'}: expected a JSON object")

    def config(component: str) -> dict[str, Any]:
        path = folder / component / "config.json"
        data = read_json(path) if path.exists() else {}
        return data if isinstance(data, dict) else {}

    unet = config("unet")
    vae = config("vae_decoder") or config("vae_encoder")
    text = config("text_encoder")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_path) if scheduler_path.exists() else {}
    vae_blocks = len(vae.get("block_out_channels", [0, 0, 0, 0]))
    unet_blocks = len(unet.get("block_out_channels", [0, 0, 0, 0]))
    graphs = {
        name: GraphSpec(file=f"{name}/model.onnx")
        for name in COMPONENTS
        if (folder / name / "model.onnx").exists()
    }
    return Manifest(
        family="unknown",
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        latent_channels=int(unet.get("in_channels", vae.get("latent_channels", 4))),
        vae_scale=2 ** (vae_blocks - 1),
        latent_multiple=2 ** (unet_blocks - 1),
        text_embed_dim=int(text.get("hidden_size", unet.get("cross_attention_dim", 768))),
        max_tokens=int(text.get("max_position_embeddings", 77)),
        graphs=graphs,
        sample_size=unet.get("sample_size"),
        source="optimum-style folder (no sdport.json)",
    )


def read_manifest(folder: Path) -> Manifest:
    """Reads `sdport.json`, or derives a manifest from an optimum-style folder without one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: model folder not found")
    path = folder / MANIFEST_FILE
    if path.exists():
        return manifest_from_json(read_json(path), str(path))
    if (folder / "model_index.json").exists():
        return _diffusers_manifest(folder)
    raise ManifestError(
        f"{folder}: neither {MANIFEST_FILE} nor model_index.json found; is this an exported "
        f"model folder? (make one with `sdport export SOURCE {folder}`)"
    )
