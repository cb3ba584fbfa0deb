"""Keras 3 models → dreamable models, exported through Keras' PyTorch backend.

``export_keras("InceptionV3", "inception_v3.onnx")`` builds a ``keras.applications`` network
(without its classifier, with dynamic H/W) or loads a ``.keras`` / legacy ``.h5`` model file, and
hands it to :func:`onnxdream.exporters.torch_export.export_module`. Under ``KERAS_BACKEND=torch``
every Keras layer is a ``torch.nn.Module`` whose ``__call__`` runs torch's hooks, so the layer
outputs are captured exactly as for torchvision, and ``torch.onnx.export`` traces the torch ops
Keras calls. The dreamable-model contract (:mod:`onnxdream.exporters.graph.contract`) holds:
the graph takes RGB [0,1] NCHW and does the model's own preprocessing (``x/127.5-1``, Caffe BGR
mean subtraction, ImageNet mean/std, or ×255 for models that scale inside; see
:mod:`onnxdream.exporters.preprocess`) and the NCHW → NHWC transpose itself. Layer names are Keras
layer names (``mixed4``, ``block4_conv3``, ``block_6_expand_relu``); 4-D channels-last layers are
listed in ``onnxdream.layer_layouts`` so that channel objectives and borders use the right axes.

Users of the TensorFlow backend save their model (``model.save("m.keras")``; the ``.keras``
format is backend-independent) and export the file in an environment with ``onnxdream[keras]``.
keras and torch are imported lazily.

The package, one concept a module: :mod:`.backend` (importing Keras on torch),
:mod:`.applications` (the ``keras.applications`` table), :mod:`.layers` (a model's layers, its
default and recommended ones), :mod:`.loading` (:func:`load_keras`: build or load, dynamic H/W)
and :mod:`.export` (:func:`export_keras`).
"""

from __future__ import annotations

from onnxdream.exporters.keras.applications import keras_applications
from onnxdream.exporters.keras.backend import import_keras
from onnxdream.exporters.keras.export import drop_noop_casts, export_keras, traceable_keras_ops
from onnxdream.exporters.keras.loading import KerasModel, load_keras, make_dynamic

__all__ = [
    "KerasModel",
    "drop_noop_casts",
    "export_keras",
    "import_keras",
    "keras_applications",
    "load_keras",
    "make_dynamic",
    "traceable_keras_ops",
]
