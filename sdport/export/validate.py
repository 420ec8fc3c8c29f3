"""Parity of an ONNX graph against the PyTorch module it came from, on random inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from sdport.errors import SdportError
from sdport.export.components import ComponentGraph


class ParityError(SdportError):
    """An exported graph disagrees with PyTorch beyond tolerance."""


@dataclass(frozen=True)
class ReferenceCase:
    batch: int
    latent: tuple[int, int]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def reference_cases(graph: ComponentGraph, sizes: list[tuple[int, int]], seed: int = 0) -> list[ReferenceCase]:
    """Runs the PyTorch module once per (batch 1 and 2) x size; stages reuse these outputs."""
    cases = []
    generator = torch.Generator().manual_seed(seed)
    for h, w in sizes:
        for batch in (1, 2):
            inputs = graph.make_inputs(batch, h, w, generator)
            with torch.no_grad():
                outputs = graph.module.eval()(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            cases.append(
                ReferenceCase(
                    batch,
                    (h, w),
                    {s.name: t.numpy() for s, t in zip(graph.inputs, inputs)},
                    {s.name: t.float().numpy() for s, t in zip(graph.outputs, outputs)},
                )
            )
    return cases


def check_parity(
    name: str, path: Path, cases: list[ReferenceCase], *, tolerance: float, stage: str
) -> dict:
    """Runs `path` in onnxruntime (CPU) on each case; errors are relative to the output's range.

    Raises ParityError naming the graph, the stage and the worst case when over tolerance.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    results, worst = [], 0.0
    for case in cases:
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, case.inputs)))
        for output, want in case.outputs.items():
            error = float(np.max(np.abs(got[output].astype(np.float32) - want)))
            scale = float(np.max(np.abs(want))) or 1.0
            relative = error / scale
            results.append(
                {"output": output, "batch": case.batch, "latent": list(case.latent),
                 "max_abs_error": error, "max_rel_error": relative}
            )
            if relative > worst:
                worst, worst_case = relative, results[-1]
    del session
    if worst > tolerance:
        raise ParityError(
            f"{name} ({stage}): max error {worst:.2e} of the output range exceeds the "
            f"{tolerance:.0e} tolerance (output {worst_case['output']!r}, batch "
            f"{worst_case['batch']}, latent {worst_case['latent']}); not writing this graph"
        )
    return {
        "tolerance": tolerance,
        "max_abs_error": max(r["max_abs_error"] for r in results),
        "max_rel_error": worst,
        "cases": results,
    }
