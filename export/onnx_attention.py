"""Attention in the form TensorRT fuses: the query scaled *before* Q·Kᵀ.

SigLIP's eager attention (what the vision graph is exported from) computes
`softmax((Q @ Kᵀ) * s) @ V`: the scale comes after the score MatMul. TensorRT's fused attention
(MHA) pattern is `MatMul(Q', Kᵀ) -> Softmax -> MatMul(·, V)` with any scale on an input, all in
one precision; a Mul between the score MatMul and the Softmax (and a Softmax kept in FP32 by the
FP16 pass) leaves it as separate kernels. `(Q * s) @ Kᵀ == (Q @ Kᵀ) * s` exactly in real
arithmetic, so the rewrite moves the scalar onto Q; in FP32 the rounding differs by an ulp or so
(the export's FP32-vs-torch check, max_abs_rel <= 1e-4, is unaffected).

Bonus in FP16: scaling Q first shrinks the scores before they are formed, so the largest logits
of so400m attention (|QKᵀ| can reach a few thousand) no longer sit near FP16's 65504 limit.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper


def _scalar(model: onnx.ModelProto, name: str) -> float | None:
    """The value of `name` when it is a one-element constant (initializer or Constant node)."""
    for t in model.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t)
            return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    arr = numpy_helper.to_array(a.t)
                    return float(arr.reshape(-1)[0]) if arr.size == 1 else None
    return None


def prescale_attention_queries(model: onnx.ModelProto) -> int:
    """Rewrite every `Softmax(Mul(MatMul(Q, Kᵀ), s))` (s a scalar constant, the MatMul and Mul
    used only there) into `Softmax(MatMul(Mul(Q, s), Kᵀ))`, in place. Returns how many."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1

    rewritten = 0
    for softmax in [n for n in g.node if n.op_type == "Softmax"]:
        mul = producer.get(softmax.input[0])
        if mul is None or mul.op_type != "Mul" or uses.get(mul.output[0]) != 1:
            continue
        for side in (0, 1):
            scores, scale = mul.input[side], mul.input[1 - side]
            matmul = producer.get(scores)
            if (
                matmul is not None
                and matmul.op_type == "MatMul"
                and uses.get(scores) == 1
                and _scalar(model, scale) is not None
            ):
                break
        else:
            continue
        q = matmul.input[0]
        # The Mul now scales Q and feeds the MatMul; the MatMul feeds the Softmax.
        scaled_q = f"{q}__prescaled_{mul.name or rewritten}"
        mul.input[:] = [q, scale]
        mul.output[:] = [scaled_q]
        matmul.input[0] = scaled_q
        softmax.input[0] = matmul.output[0]
        rewritten += 1
    if rewritten:
        _topological_sort(g)
    return rewritten


def _topological_sort(g: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before use (the Mul moved before its MatMul)."""
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            names = ", ".join(n.name for n in rest[:3])
            raise ValueError(f"graph has a cycle or a missing input near {names}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def attention_layout(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of Softmax inputs by producer: "matmul" (prescaled or unscaled, fusable) or "mul"
    (scaled after the score MatMul, not fusable) — what a test checks on a shipped file."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Softmax":
            src = producer.get(n.input[0], "input")
            # an FP16 graph may have a Cast between (the FP16 pass keeping Softmax in FP32)
            key = {"MatMul": "matmul", "Mul": "mul", "Cast": "cast"}.get(src, src.lower())
            out[key] = out.get(key, 0) + 1
    return out
