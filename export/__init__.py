"""Export of wesam models: merged LoRA weights, ONNX graphs, TensorRT engines, Triton repositories.

Layering: ``export`` imports ``adapters`` (never ``service``); ``adapters`` never imports
``export``. Heavy dependencies (onnx, onnxruntime, tensorrt, tritonclient) are imported inside
the modules that need them, so ``import export`` and ``wesam export --help`` stay fast.
"""

from .errors import ExportError

__all__ = ["ExportError"]
