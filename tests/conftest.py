"""Shared fixtures: the tiny model is built once per test session (a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """onnxruntime's pre-optimized graphs go to a folder of this test session, not the user's
    ~/.cache/sdport/ort (the tests load hundreds of throwaway graphs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDPORT_ORT_CACHE", str(tmp_path_factory.mktemp("ort-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x pipeline in diffusers' folder format (real classes, real vocab)."""
    from sdport.export.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "diffusers")


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_diffusers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with the default settings (onnxruntime fusions, fp32)."""
    from sdport.export.folder import export_model

    return export_model(tiny_diffusers_dir, tmp_path_factory.mktemp("tiny") / "onnx", report=None)
