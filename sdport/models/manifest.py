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
MAX_JSON_BYTES = 64 << 20  # manifests and configs are kilobytes; don't read a hostile huge one


class ManifestError(SdportError, ValueError):
    """A model folder or its manifest is unusable; the message says what, where and how to fix."""


# The text encoder's optional third output, [B, layers - 1, T, D]: at index k - 1 the hidden state
# k layers before the last through the final LayerNorm, which diffusers' clip_skip = k takes.
CLIP_SKIP_OUTPUT = "clip_skip_hidden_states"


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
        manifest = Manifest(**values)
    except TypeError as exc:
        raise ManifestError(f"{where}: {exc}") from exc
    check_manifest(manifest, where)
    return manifest


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DTYPES = ("float32", "float16", "float64", "int64", "int32")


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_manifest(m: Manifest, where: str) -> None:
    """Types and ranges of every field, so a hand-edited or hostile manifest fails here, by name."""

    def bad(field_name: str, value: Any, wants: str) -> ManifestError:
        return ManifestError(f"{where}: {field_name} is {value!r}, wants {wants}; re-export the model")

    for name in ("family", "tokenizer_dir", "scheduler_config", "source"):
        if not isinstance(getattr(m, name), str):
            raise bad(name, getattr(m, name), "a string")
    if m.prediction_type not in PREDICTION_TYPES:
        raise bad("prediction_type", m.prediction_type, " or ".join(PREDICTION_TYPES))
    factor = m.vae_scaling_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1e6:
        raise bad("vae_scaling_factor", factor, "a positive number (0.18215 for SD)")
    # Powers of two: the VAE and the UNet halve the resolution per block.
    for name, high in (("vae_scale", 64), ("latent_multiple", 64)):
        value = getattr(m, name)
        if not (_is_int(value, 1, high) and value & (value - 1) == 0):
            raise bad(name, value, f"a power of two up to {high}")
    for name, high in (("latent_channels", 1024), ("text_embed_dim", 1 << 16), ("max_tokens", 1 << 16)):
        if not _is_int(getattr(m, name), 1, high):
            raise bad(name, getattr(m, name), f"an integer in [1, {high}]")
    if m.max_tokens < 2:
        raise bad("max_tokens", m.max_tokens, "at least 2 (start and end tokens)")
    if m.sample_size is not None and not _is_int(m.sample_size, 1, 1024):
        raise bad("sample_size", m.sample_size, "null or an integer in [1, 1024]")
    for name, graph in m.graphs.items():
        at = f"graphs.{name}"
        if not isinstance(graph.sha256, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in graph.sha256.items()
        ):
            raise bad(f"{at}.sha256", graph.sha256, "an object of file -> hex digest")
        if graph.optimization not in ("none", "portable", "ort"):
            raise bad(f"{at}.optimization", graph.optimization, "none, portable or ort")
        for spec in (*graph.inputs, *graph.outputs):
            if spec.dtype not in DTYPES:
                raise bad(f"{at} tensor {spec.name!r} dtype", spec.dtype, ", ".join(DTYPES))
            if not all(isinstance(d, str) or _is_int(d, 0, 1 << 31) for d in spec.shape):
                raise bad(f"{at} tensor {spec.name!r} shape", list(spec.shape), "a list of sizes or dim names")


def read_json(path: Path) -> Any:
    """Reads a JSON file, turning every failure into a ManifestError that names the file."""
    try:
        if Path(path).stat().st_size > MAX_JSON_BYTES:
            raise ManifestError(f"{path}: {Path(path).stat().st_size} bytes is far too large for a config file")
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: file not found; the model folder is incomplete: re-export it") from exc
    except OSError as exc:  # a folder where the file should be, permissions
        raise ManifestError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc}); re-export the model") from exc
    except RecursionError:  # `[[[[...` nested deeper than Python's stack
        raise ManifestError(f"{path}: not valid JSON (nested too deeply); re-export the model") from None


def inside(folder: Path, relative: str) -> Path:
    """Resolves `relative` under `folder`, refusing anything (`..`, absolute, symlinks) that leaves it."""
    root = Path(folder).resolve()
    try:
        target = (root / relative).resolve()
    except (ValueError, OSError, RuntimeError) as exc:  # a NUL byte, a symlink loop
        raise ManifestError(f"{relative!r} in the model folder {root} is not a usable path ({exc})") from None
    if not target.is_relative_to(root):
        raise ManifestError(f"{relative!r} points outside the model folder {root}; refusing to read it")
    return target


def _diffusers_manifest(folder: Path) -> Manifest:
    """Derives a manifest from an optimum-style folder (model_index.json + component configs)."""
    index = read_json(inside(folder, "model_index.json"))
    if not isinstance(index, dict):
        raise ManifestError(f"{folder / 'model_index.json'}: expected a JSON object")

    def config(relative: str) -> dict[str, Any]:
        path = inside(folder, relative)
        data = read_json(path) if path.exists() else {}
        return data if isinstance(data, dict) else {}

    unet = config("unet/config.json")
    vae = config("vae_decoder/config.json") or config("vae_encoder/config.json")
    text = config("text_encoder/config.json")
    scheduler = config("scheduler/scheduler_config.json")

    def blocks(data: dict[str, Any], where: str) -> int:
        value = data.get("block_out_channels", [0, 0, 0, 0])
        if not isinstance(value, list) or not 1 <= len(value) <= 7:
            raise ManifestError(f"{folder / where}: block_out_channels {value!r} is not a list of 1 to 7 sizes")
        return len(value)

    graphs = {
        name: GraphSpec(file=f"{name}/model.onnx")
        for name in COMPONENTS
        if (folder / name / "model.onnx").exists()
    }
    manifest = Manifest(
        family="unknown",
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        vae_scaling_factor=vae.get("scaling_factor", 0.18215),
        latent_channels=unet.get("in_channels", vae.get("latent_channels", 4)),
        vae_scale=2 ** (blocks(vae, "vae_decoder/config.json") - 1),
        latent_multiple=2 ** (blocks(unet, "unet/config.json") - 1),
        text_embed_dim=text.get("hidden_size", unet.get("cross_attention_dim", 768)),
        max_tokens=text.get("max_position_embeddings", 77),
        graphs=graphs,
        sample_size=unet.get("sample_size"),
        source="optimum-style folder (no sdport.json)",
    )
    check_manifest(manifest, f"{folder} (derived from model_index.json and the component configs)")
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """Reads `sdport.json`, or derives a manifest from an optimum-style folder without one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: model folder not found")
    path = folder / MANIFEST_FILE
    if path.exists() or path.is_symlink():
        return manifest_from_json(read_json(inside(folder, MANIFEST_FILE)), str(path))
    if (folder / "model_index.json").exists() or (folder / "model_index.json").is_symlink():
        return _diffusers_manifest(folder)
    raise ManifestError(
        f"{folder}: neither {MANIFEST_FILE} nor model_index.json found; is this an exported "
        f"model folder? (make one with `sdport export SOURCE {folder}`)"
    )
