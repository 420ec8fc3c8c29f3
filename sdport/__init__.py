"""sdport: export Stable Diffusion to ONNX, and run it anywhere without PyTorch."""

__version__ = "0.1.0"
