"""`cheapest.GroupAttention` (rust/ortops/attention.rs) against ONNX Runtime's GroupQueryAttention on the same
inputs: a right-padded batch of prompts, then decode steps over a KV buffer bound as both past and present (the
runner's layout), the copying form (present separate from past), a sliding window, a scale, and the nodes the
pass must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cheapest.convert.graph_builder import MS_DOMAIN
from cheapest.convert.graph_passes import CHEAPEST_DOMAIN, cpu_graph
from cheapest.engine.loader import session_options

HEADS, KV_HEADS, DIM, POSITIONS = 6, 2, 64, 64


def gqa_model(rotary: int, **attrs: object) -> onnx.ModelProto:
    width = (HEADS + 2 * KV_HEADS) * DIM
    kv = ["batch", KV_HEADS, "capacity", DIM]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", "seq", width]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    angles = np.arange(POSITIONS, dtype=np.float64)[:, None] / 10000.0 ** (np.arange(rotary // 2) / (rotary // 2))
    tables = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
              numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"],
                            ["out", "present_key", "present_value"], domain=MS_DOMAIN, num_heads=HEADS,
                            kv_num_heads=KV_HEADS, do_rotary=1, **attrs)
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", HEADS * DIM]),
               helper.make_tensor_value_info("present_key", TensorProto.FLOAT, kv),
               helper.make_tensor_value_info("present_value", TensorProto.FLOAT, kv)]
    graph = helper.make_graph([node], "gqa", inputs, outputs, tables)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])


class Shared:
    """One session over a [batch, kv heads, capacity, dim] buffer per K and V bound as past and present."""

    def __init__(self, model: onnx.ModelProto, batch: int, capacity: int) -> None:
        self.session = ort.InferenceSession(model.SerializeToString(), session_options(2), providers=["CPUExecutionProvider"])
        self.k = np.zeros((batch, KV_HEADS, capacity, DIM), np.float32)
        self.v = np.zeros_like(self.k)

    def step(self, qkv: np.ndarray, seqlens: np.ndarray, total: int) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("qkv", qkv)
        binding.bind_cpu_input("seqlens_k", seqlens.astype(np.int32))
        binding.bind_cpu_input("total", np.array(total, np.int32))
        binding.bind_output("out", "cpu")  # bound first: get_outputs()[0]
        for name, buf in (("key", self.k), ("value", self.v)):
            binding.bind_input(f"past_{name}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            binding.bind_output(f"present_{name}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.get_outputs()[0].numpy())


def rewritten(model: onnx.ModelProto) -> onnx.ModelProto:
    new = onnx.ModelProto()
    new.CopyFrom(model)
    cpu_graph(new)
    assert [(n.domain, n.op_type) for n in new.graph.node] == [(CHEAPEST_DOMAIN, "GroupAttention")]
    return new


@pytest.mark.parametrize(("rotary", "attrs"), [(DIM, {}), (DIM // 2, {}), (DIM, {"local_window_size": 3}),
                                               (DIM, {"scale": 0.05, "rotary_interleaved": 0})])
def test_prompts_then_decode_steps_match_group_query_attention(rotary: int, attrs: dict) -> None:
    rng = np.random.default_rng(5)
    model = gqa_model(rotary, **attrs)
    ours, theirs = Shared(rewritten(model), 3, 16), Shared(model, 3, 16)
    width = (HEADS + 2 * KV_HEADS) * DIM
    # A right-padded batch of three prompts (5, 2 and 4 tokens), then six decode steps.
    lengths = np.array([5, 2, 4])
    qkv = rng.standard_normal((3, 5, width), dtype=np.float32)
    got = ours.step(qkv, lengths - 1, 5)
    shared = theirs.step(qkv, lengths - 1, 5)
    # The prompt's outputs also against a run without a past (present then separate memory).
    plain = ort.InferenceSession(model.SerializeToString(), session_options(2), providers=["CPUExecutionProvider"])
    empty = np.zeros((3, KV_HEADS, 0, DIM), np.float32)
    want = plain.run(["out"], {"qkv": qkv, "past_key": empty, "past_value": empty,
                               "seqlens_k": (lengths - 1).astype(np.int32), "total": np.array(5, np.int32)})[0]
    for b, n in enumerate(lengths):  # padded query positions are undefined in GroupQueryAttention
        np.testing.assert_allclose(got[b, :n], want[b, :n], rtol=0, atol=2e-5)
        np.testing.assert_allclose(got[b, :n], shared[b, :n], rtol=0, atol=2e-5)
    for _ in range(6):
        qkv = rng.standard_normal((3, 1, width), dtype=np.float32) * 2
        got, want = ours.step(qkv, lengths, int(lengths.max()) + 1), theirs.step(qkv, lengths, int(lengths.max()) + 1)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
        lengths += 1
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(ours.k[b, :, :n], theirs.k[b, :, :n], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(ours.v[b, :, :n], theirs.v[b, :, :n])


def test_present_apart_from_past_copies_the_cache() -> None:
    """Plain runs (no binding): present is new memory of max(capacity, total) positions, the past copied in."""
    rng = np.random.default_rng(6)
    model = gqa_model(DIM)
    sessions = [ort.InferenceSession(m.SerializeToString(), session_options(2), providers=["CPUExecutionProvider"])
                for m in (rewritten(model), model)]
    width = (HEADS + 2 * KV_HEADS) * DIM
    past = rng.standard_normal((2, KV_HEADS, 4, DIM), dtype=np.float32)
    feeds = {"qkv": rng.standard_normal((2, 1, width), dtype=np.float32), "past_key": past, "past_value": past * 0.5,
             "seqlens_k": np.array([3, 2], np.int32), "total": np.array(4, np.int32)}
    (out, pk, pv), (want_out, want_k, want_v) = (s.run(None, feeds) for s in sessions)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=2e-5)
    for b, n in enumerate([4, 3]):
        np.testing.assert_allclose(pk[b, :, :n], want_k[b, :, :n], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(pv[b, :, :n], want_v[b, :, :n])
    # A longer total than the past's capacity grows present (GroupQueryAttention's max(capacity, total)).
    feeds.update(seqlens_k=np.array([4, 1], np.int32), total=np.array(5, np.int32))
    (out, pk, _), (want_out, want_k, _) = (s.run(None, feeds) for s in sessions)
    assert pk.shape == want_k.shape == (2, KV_HEADS, 5, DIM)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("seqlens", "total", "message"), [
    (79, 80, "the new positions exceed the cache or the rotary tables"),  # position 79 of a 64-position rotary table
    (-5, 1, "seqlens_k must not be negative"),
])
def test_bad_inputs_are_refused_by_name(seqlens: int, total: int, message: str) -> None:
    session = ort.InferenceSession(rewritten(gqa_model(DIM)).SerializeToString(), session_options(2),
                                   providers=["CPUExecutionProvider"])
    past = np.zeros((1, KV_HEADS, 4, DIM), np.float32)
    feeds = {"qkv": np.zeros((1, 1, (HEADS + 2 * KV_HEADS) * DIM), np.float32), "past_key": past, "past_value": past,
             "seqlens_k": np.array([seqlens], np.int32), "total": np.array(total, np.int32)}
    with pytest.raises(Exception, match=f"GroupAttention: {message}"):  # noqa: PT011 - ONNX Runtime's own type
        session.run(None, feeds)


@pytest.mark.parametrize("attrs", [{"softcap": 30.0}, {"rotary_interleaved": 1}, {"smooth_softmax": 1}])
def test_variants_it_does_not_compute_are_left_alone(attrs: dict) -> None:
    model = gqa_model(DIM, **attrs)
    assert [n.op_type for n in cpu_graph(model).graph.node] == ["GroupQueryAttention"]
