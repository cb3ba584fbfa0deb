"""Dreaming in the browser: the static site that onnxruntime-web runs."""
