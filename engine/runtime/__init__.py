"""onnxruntime: sessions, gradient models, the compiled-graph and model caches, the device loop,
predict."""
