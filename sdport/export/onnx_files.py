"""Saving ONNX graphs the way the runtime expects: one file, or one external-data file over 2 GB;
and the JSON records our graph rewrites leave in a graph's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import onnx

# protobuf's hard limit is 2 GiB; stay under it with headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_SUFFIX = "_data"  # model.onnx -> model.onnx_data, as optimum names it


def weights_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += sum(int(e.value) for e in tensor.external_data if e.key == "length")
    return total


def save_model(model: onnx.ModelProto, path: Path) -> str | None:
    """Saves `model` at `path`; returns the external-data file name when the weights need one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + EXTERNAL_DATA_SUFFIX
    (path.parent / data_name).unlink(missing_ok=True)  # onnx appends to an existing data file
    if weights_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return None
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data_name, size_threshold=1024,
    )
    return data_name


def load_model(path: Path) -> onnx.ModelProto:
    return onnx.load_model(str(path), load_external_data=True)


def resave(path: Path, edit: Callable[[onnx.ModelProto], object] | None = None) -> str | None:
    """Rewrites a graph in place in our layout (e.g. one data file instead of one per tensor),
    after `edit` (if given) has changed the loaded model in place."""
    model = onnx.load_model(str(path), load_external_data=False)
    stale = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    if edit is not None:
        edit(model)
    for name in stale:
        (path.parent / name).unlink(missing_ok=True)
    return save_model(model, path)


def json_metadata(model: onnx.ModelProto, key: str) -> Any | None:
    """The JSON record stored under `key` in the graph's metadata, or None."""
    value = next((p.value for p in model.metadata_props if p.key == key), None)
    return json.loads(value) if value else None


def set_json_metadata(model: onnx.ModelProto, key: str, record: Any | None) -> None:
    """Stores `record` under `key` in the graph's metadata; an empty one (None, {}) removes the key."""
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if record:
        model.metadata_props.add(key=key, value=json.dumps(record, sort_keys=True))
