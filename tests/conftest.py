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


# The graph an onnxruntime session runs, by its first output's name.
GRAPH_OF_OUTPUT = {"last_hidden_state": "text_encoder", "out_sample": "unet", "sample": "vae_decoder",
                   "latent_parameters": "vae_encoder"}


class SessionRuns:
    """The onnxruntime runs of a test, whichever path made them (Graph.run, or the direct calls
    of Graph.repeated): `runs`, each [graph name, feeds, last] (last: the run released the
    graph's memory after it, as Graph.run(last=True) does); `alter(graph, outputs) -> outputs or
    None`, when set, may replace a run's outputs (a dict by name) or raise."""

    def __init__(self) -> None:
        self.runs: list[list] = []
        self.alter = None

    def of(self, graph: str) -> list[list]:
        return [run for run in self.runs if run[0] == graph]


@pytest.fixture
def session_runs(monkeypatch: pytest.MonkeyPatch) -> SessionRuns:
    import onnxruntime as ort

    from sdport.runtime import sessions

    spy = SessionRuns()
    real_run, real_release = ort.InferenceSession.run, sessions.release_mapped_pages

    def run(self, output_names, input_feed, run_options=None):
        names = output_names or [output.name for output in self.get_outputs()]
        graph = GRAPH_OF_OUTPUT.get(self.get_outputs()[0].name)
        results = real_run(self, output_names, input_feed, run_options)
        spy.runs.append([graph, dict(input_feed), False])
        changed = spy.alter(graph, dict(zip(names, results))) if spy.alter is not None else None
        return results if changed is None else [changed[name] for name in names]

    def release(files):
        spy.runs[-1][2] = True
        return real_release(files)

    monkeypatch.setattr(ort.InferenceSession, "run", run)
    monkeypatch.setattr(sessions, "release_mapped_pages", release)
    return spy
