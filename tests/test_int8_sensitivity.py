"""Sensitivity-aware INT8: each node measured alone, the fewest most harmful kept fp32 until the final
embeddings reach the asked cosine to fp32 on held-out data, and those nodes left fp32 in the graph."""

import numpy as np
import onnx
import pytest

from autoglm_train.compress.quantize import quantize_graph
from autoglm_train.compress.sensitivity import embedding_fidelity, run_graph


def mlp(path):
    """Three dense layers as an ONNX graph; the first writes a few huge activations (an outlier
    feature), which stretch the next layer's int8 input range so that the rest of its input rounds to a
    few levels: int8 hurts some nodes far more than others."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = (
        (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in ((16, 64), (64, 64), (64, 8))
    )
    w1[:, :2] *= 60.0
    init = [onnx.numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["h1"], name="dense1"),
        onnx.helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        onnx.helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="dense2"),
        onnx.helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        onnx.helper.make_node("MatMul", ["r2", "w3"], ["y"], name="dense3"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])],
        init,
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    return path


def batches(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((32, 16)).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def mlp_graph(tmp_path_factory):
    return mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx")


def quantized_inputs(path) -> dict[str, bool]:
    """Per compute node of a graph: whether its weight reaches it through a DequantizeLinear (int8)."""
    graph = onnx.load(str(path)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    return {
        n.name: made_by.get(n.input[1]) == "DequantizeLinear" for n in graph.node if n.op_type == "MatMul"
    }


def test_auto_keeps_the_fewest_most_harmful_nodes_fp32_and_reaches_the_target_held_out(mlp_graph, tmp_path):
    calibration, held_out = batches(4, seed=1), batches(4, seed=2)
    everything = quantize_graph(mlp_graph, tmp_path / "all.onnx", "static", "x", calibration)
    reference = run_graph(mlp_graph, [{"x": b} for b in held_out])[0]
    full_cosine = embedding_fidelity(
        reference, run_graph(tmp_path / "all.onnx", [{"x": b} for b in held_out])[0]
    )
    assert everything["excluded"] == [] and all(quantized_inputs(tmp_path / "all.onnx").values())

    target = 0.995
    assert full_cosine["cosine"] < target  # the test means something: quantizing everything misses it
    done = quantize_graph(mlp_graph, tmp_path / "auto.onnx", "static", "x", calibration, "auto", target)
    effects = done["effects"]
    assert [e["final_cosine"] for e in effects] == sorted(e["final_cosine"] for e in effects)
    assert {e["node"] for e in effects} == {"dense1", "relu1", "dense2", "relu2", "dense3"}
    assert all(0 < e["output_cosine"] <= 1 + 1e-9 and e["output_rel_error"] >= 0 for e in effects)
    # the fewest: one fewer of the worst missed the target on the selection batches
    tried = dict(done["tried"])
    count = len(done["excluded"])
    assert done["reached"] and tried[count] >= target and count >= 1 and tried[count - 1] < target
    assert done["excluded"] == [e["node"] for e in effects[:count]]
    # the excluded nodes stay fp32 in the written graph, the others are int8
    inputs = quantized_inputs(tmp_path / "auto.onnx")
    assert not any(inputs[n] for n in done["excluded"] if n in inputs)
    assert any(inputs.values())
    held = embedding_fidelity(reference, run_graph(tmp_path / "auto.onnx", [{"x": b} for b in held_out])[0])
    assert held["cosine"] >= target > full_cosine["cosine"]


def test_a_broken_row_counts_as_the_worst_not_as_a_match():
    # a quantized -inf attention mask writes NaN embeddings: they must fail any target, not reach it
    reference = np.ones((3, 4), np.float32)
    candidate = reference.copy()
    candidate[1] = np.nan
    fidelity = embedding_fidelity(reference, candidate)
    assert fidelity["min_cosine"] == -1.0 and fidelity["cosine"] == pytest.approx(1 / 3)
    assert fidelity["rel_error"] == np.inf
