"""ONNX op facts: which ops carry no gradient, which tensor types are floats, what a node reads
and which node makes a tensor.

A leaf (onnx only): the contract, autodiff, the importer's layer scan and the receptive field
read these here rather than from one another.
"""

from __future__ import annotations

import onnx

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}

# Ops whose outputs carry no gradient (integer/boolean results, shapes, piecewise constants).
NON_DIFFERENTIABLE = {
    "Shape", "Size", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "NonZero", "ConstantOfShape", "Range",
    "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf", "RandomNormalLike", "RandomUniformLike",
    "EyeLike", "Constant", "BitShift", "Mod",
}


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope tensors its subgraphs (If/Loop/Scan) read."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                names.extend(i for i in node_inputs(n) if i not in defined)
                defined.update(n.output)
    return names


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name → the node of the main graph that makes it."""
    return {o: n for n in model.graph.node for o in n.output if o}
