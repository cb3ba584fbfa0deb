"""onnxdream: DeepDream and feature visualisation on onnxruntime alone."""

from onnxdream.core.errors import OnnxDreamError

__version__ = "0.1.0"

__all__ = ["OnnxDreamError", "__version__"]
