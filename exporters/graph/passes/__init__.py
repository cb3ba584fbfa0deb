"""The optimiser's passes, by what they rewrite; :mod:`onnxdream.exporters.graph.optimize` lists
them (``PASSES``) and runs them.

- :mod:`.view`: :class:`~.view.GraphView`, the mutable graph every pass takes;
- :mod:`.fold`: constants, BatchNorm and per-channel scales folded into the weights;
- :mod:`.masks`: the activations' backward masks;
- :mod:`.adjoints`: the adjoints of MaxPool and strided Conv, emitted by :mod:`.fast_adjoints`;
- :mod:`.simplify`: Identities, Sums, chained Slices, dead code.
"""

from __future__ import annotations
