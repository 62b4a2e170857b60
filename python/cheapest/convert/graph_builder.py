"""A small, deterministic ONNX graph builder shared by the reference and the fused graph.

Names are generated from a counter, initializers are kept in insertion order, and the model is saved
with one external-data file, so converting the same GGUF twice gives the same bytes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .gguf_reader import HParams
from cheapest.model_layout import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_names, present_names

# ONNX Runtime 1.20+ reads IR version 10; newer `onnx` releases default to a version older runtimes reject.
IR_VERSION = 10
OPSET = 18
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counter = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant initializer, shared by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], *, output: str | None = None, domain: str = "",
           name: str | None = None, **attrs: Any) -> str:
        """A one-output node; `output` names its output (a graph output, say), else a fresh name."""
        return self.ops(op_type, inputs, outputs=1 if output is None else [output], domain=domain, name=name,
                        **attrs)[0]

    def ops(self, op_type: str, inputs: list[str], *, outputs: int | list[str], domain: str = "",
            name: str | None = None, **attrs: Any) -> list[str]:
        """A node with several outputs: `outputs` fresh ones, or these names ("" = an unused optional one)."""
        node_name = name or self.fresh(op_type)
        outs = outputs if isinstance(outputs, list) else [f"{node_name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None, **attrs))
        return outs

    def model(self, *, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            ir_version=IR_VERSION,
            producer_name="cheapest",
            doc_string=doc,
        )
        return model


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """`<name>.onnx` + `<name>.onnx_data` (Hugging Face export layout)."""
    data_name = path.name + "_data"
    for p in (path, path.with_name(data_name)):
        if p.exists():
            os.remove(p)  # onnx appends to an existing data file
    # onnx checks whether `location` exists relative to the CURRENT directory, not the model's, and refuses
    # when a same-named file happens to be there; saving from the model's own directory makes the check right.
    with contextlib.chdir(path.parent):
        onnx.save_model(
            model,
            path.name,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )


def ffn_norm_name(hp: HParams) -> str:
    """Hugging Face's name for the norm before the feed-forward block (Gemma also has one after the attention)."""
    return "pre_feedforward_layernorm" if hp.post_norms else "post_attention_layernorm"


def rope_tables(head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] for the half-split rotary layout (computed in float64, stored fp32)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32


@dataclass(frozen=True)
class GraphIO:
    """The inputs every decoder graph takes (names from cheapest.model_layout)."""

    input_ids: str
    attention_mask: str
    position_ids: str
    past: list[tuple[str, str]]  # (key, value) per layer


def declare_io(g: GraphBuilder, *, n_layer: int, n_kv_heads: int, head_dim: int, vocab_size: int,
               logits_positions: str | int) -> GraphIO:
    """The export's inputs and outputs: logits first, then present.{i}.key/.value, as Hugging Face orders them.

    `logits_positions`: the logits' second axis ("sequence_length" for every position, 1 for the last)."""
    input_ids = g.input(INPUT_IDS, INT64, ["batch_size", "sequence_length"])
    attention_mask = g.input(ATTENTION_MASK, INT64, ["batch_size", "total_sequence_length"])
    position_ids = g.input(POSITION_IDS, INT64, ["batch_size", "sequence_length"])
    g.output(LOGITS, FLOAT, ["batch_size", logits_positions, vocab_size])
    past = []
    for i in range(n_layer):
        key, value = (g.input(name, FLOAT, ["batch_size", n_kv_heads, "past_sequence_length", head_dim])
                      for name in past_names(i))
        past.append((key, value))
        for name in present_names(i):
            g.output(name, FLOAT, ["batch_size", n_kv_heads, "total_sequence_length", head_dim])
    return GraphIO(input_ids, attention_mask, position_ids, past)
