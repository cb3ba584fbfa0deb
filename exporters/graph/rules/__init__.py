"""The gradient rules, one module per op family, each rule registered by op type with
:func:`onnxdream.exporters.graph.autodiff.rule`.

:func:`onnxdream.exporters.graph.autodiff.differentiate` imports the modules, which registers
them: :mod:`.math` (elementwise, reductions, matrix products, normalisations), :mod:`.nn`
(convolutions, pooling), :mod:`.shape` (reshapes, transposes, concat/split, slicing, gathers)
and :mod:`.resize`. A new module goes into that import.
"""

from __future__ import annotations
