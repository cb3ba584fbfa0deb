"""The optimiser's view of a graph: a mutable node list with its constants, producers and
consumers, and the builder that emits the passes' new nodes.

Every pass (:mod:`.fold`, :mod:`.masks`, :mod:`.adjoints`, :mod:`.simplify`) takes a
:class:`GraphView` and returns how many rewrites it made;
:func:`onnxdream.exporters.graph.optimize.optimize` builds the view, runs the passes and writes
the result back.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxdream.exporters.graph.builder import GraphBuilder


class GraphView:
    """A mutable view of a GraphProto: node list, constant table, producers and consumers.

    New nodes and constants are emitted through :attr:`b` (a GraphBuilder, names ``opt/...``):
    ``begin()``, emit, ``take()`` the new nodes.
    """

    def __init__(self, graph: onnx.GraphProto, opset: int, maxpool_max_stride: int = 1):
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.inits: dict[str, onnx.TensorProto] = {i.name: i for i in graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input}
        self.dtypes: dict[str, int] = {}
        # pool output -> (dY, dX), see adjoints.maxpool_backward
        self.pool_grads: dict[str, tuple[str, str]] = {}
        # the largest MaxPool stride maxpool_backward rewrites (see optimize.MAXPOOL_MAX_STRIDE)
        self.maxpool_max_stride = maxpool_max_stride
        self._names = {o for n in self.nodes for o in n.output} | set(self.inits) | self.inputs
        self.b = GraphBuilder(opset, "opt", self._names)
        self.index()

    def index(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        for n in self.nodes:  # subgraphs (If/Loop) use outer names implicitly: treat as used
            for a in n.attribute:
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                        for sub in g.node:
                            for i in sub.input:
                                self.consumers.setdefault(i, []).append(n)

    # -- constants ----------------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, else None. A graph input is never a constant, even
        with a same-named initializer: that is its default, which a caller overrides (the
        objective parameters, see the contract)."""
        if name in self.inputs:
            return None
        self._adopt()
        if name in self._arrays:
            return self._arrays[name]
        if name in self.inits:
            arr = numpy_helper.to_array(self.inits[name])
            self._arrays[name] = arr
            return arr
        n = self.producer.get(name)
        if (n is not None and n.op_type == "Constant" and n.attribute
                and n.attribute[0].name == "value"):
            arr = numpy_helper.to_array(n.attribute[0].t)
            self._arrays[name] = arr
            return arr
        return None

    def _adopt(self) -> None:
        """Take the builder's new initializers into the constant table."""
        for t in self.b.initializers:
            self.inits[t.name] = t
        self.b.initializers.clear()

    def set_const(self, name: str, arr: np.ndarray) -> None:
        """Make ``name`` an initializer holding ``arr`` (a folded node's output)."""
        self.inits[name] = numpy_helper.from_array(arr, name)
        self._arrays[name] = arr

    def add_const(self, arr: np.ndarray, hint: str = "const") -> str:
        """A new (unshared) constant: folded weights."""
        name = self.b.initializer(np.ascontiguousarray(arr), hint=hint)
        self._adopt()
        self._arrays[name] = arr
        return name

    def begin(self) -> None:
        self.b.nodes = []

    def take(self) -> list[onnx.NodeProto]:
        """The nodes emitted since :meth:`begin`."""
        new, self.b.nodes = self.b.nodes, []
        self._adopt()
        return new

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]

    def splice(self, replace: dict[int, list[onnx.NodeProto]] | None = None,
               drop: set[int] | frozenset[int] = frozenset(),
               after: dict[int, list[onnx.NodeProto]] | None = None) -> None:
        """Rebuild the node list, then re-index: nodes whose id is in ``drop`` go,
        ``replace[id(n)]`` stands in for n, ``after[id(n)]`` follows it."""
        replace, after = replace or {}, after or {}
        out: list[onnx.NodeProto] = []
        for n in self.nodes:
            if id(n) not in drop:
                out.extend(replace.get(id(n), [n]))
                out.extend(after.get(id(n), []))
        self.nodes = out
        self.index()

    def rename_uses(self, old: str, new: str) -> None:
        for n in self.consumers.get(old, []):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new

    def finish(self) -> onnx.GraphProto:
        g = self.graph
        del g.node[:]
        g.node.extend(self.nodes)
        used = {i for n in self.nodes for i in n.input} | self.outputs
        for n in self.nodes:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    used |= {i for s in a.g.node for i in s.input}
        del g.initializer[:]
        g.initializer.extend(t for name, t in self.inits.items() if name in used)
        return g


def is_scalar(arr: np.ndarray | None, value: float | None = None) -> bool:
    if arr is None or arr.size != 1:
        return False
    return value is None or float(arr.reshape(-1)[0]) == value
