"""Fixtures: small real models (a scikit-learn fraud pipeline, ONNX graphs built with onnx.helper)
and one `inferd serve` process with only tensor models and an admin key."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from inferd.classic.examples import embeddings, fraud_data, recommender_graph, train_fraud  # noqa: E402
from tests.api.conftest import ServerProc  # noqa: E402

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")


ADMIN = "classic-admin-key"
PRICE_PER_1K = 0.5  # USD per 1,000 predictions: every call costs something visible


def affine_graph():
    """Two inputs, two outputs: y = a @ W + b (FP32 [-1, 4] -> [-1, 2]) and n = sum(a) (per row)."""
    import onnx
    from onnx import TensorProto as tp
    from onnx import helper, numpy_helper

    w = np.arange(8, dtype=np.float32).reshape(4, 2) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["aw"]), helper.make_node("Add", ["aw", "b"], ["y"]),
         helper.make_node("ReduceSum", ["a", "axes"], ["n"], keepdims=0)],
        "affine",
        [helper.make_tensor_value_info("a", tp.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("b", tp.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", tp.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("n", tp.FLOAT, ["batch"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, w


@pytest.fixture(scope="session")
def fraud_model():
    x, y = fraud_data(n_samples=3000, seed=1)
    return train_fraud(x, y, n_estimators=20, seed=1), x


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, fraud_model):
    import joblib

    d = tmp_path_factory.mktemp("classic-models")
    joblib.dump(fraud_model[0], d / "fraud.joblib")
    (d / "affine.onnx").write_bytes(affine_graph()[0].SerializeToString())
    users, items = embeddings(50, 400, 8, seed=3)
    (d / "rec.onnx").write_bytes(recommender_graph(users, items, 5).SerializeToString())
    np.save(d / "users.npy", users)
    np.save(d / "items.npy", items)
    return d


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classic-server")
    config = {"models": [
        {"name": "fraud", "price": {"per_1k_predictions": PRICE_PER_1K}, "deployments": [
            {"provider": "onnx", "model": str(model_dir / "fraud.joblib"), "max_batch_size": 64,
             "max_queue_delay_microseconds": 3000}]},
        {"name": "affine", "deployments": [{"provider": "onnx", "model": str(model_dir / "affine.onnx"),
                                            "version": "3"}]},
        {"name": "rec", "deployments": [{"provider": "onnx", "model": str(model_dir / "rec.onnx")}]},
    ]}
    path = tmp / "inferd.yaml"
    path.write_text(yaml.safe_dump(config))
    server = ServerProc(path, "--config", str(path), "--store", f"sqlite:///{tmp}/s.db", api_key=ADMIN).wait_ready()
    server.store_url = f"sqlite:///{tmp}/s.db"
    yield server
    server.stop()
