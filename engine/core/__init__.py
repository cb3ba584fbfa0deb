"""The base layer: typed errors, atomic writes, fd redirection, environment variables, the ImageNet
labels, the static folder. Imports nothing of onnxdream; exporters/ and models/ use it too."""
