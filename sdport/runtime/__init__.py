"""The torch-free runtime: onnxruntime + NumPy + tokenizers + Pillow.

    from sdport.runtime import Pipeline
    images = Pipeline.load("model-onnx").generate(prompt="a red fox", seed=0)

Nothing under sdport.runtime imports torch, transformers, diffusers, onnx or sdport.export.
`Pipeline` is imported on first use, so `import sdport.runtime.schedulers` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdport.runtime.pipeline import Pipeline

__all__ = ["Pipeline"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from sdport.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdport.runtime' has no attribute {name!r}")
