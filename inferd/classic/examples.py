"""Two models to serve offline: a fraud scorer and a recommender, made here from synthetic data.

`fraud` trains a gradient-boosted classifier (scikit-learn's GradientBoostingClassifier behind a
StandardScaler, both in the exported graph) on an imbalanced synthetic transaction set
(`make_classification` with about 1.5% fraud), reports its holdout ROC AUC and average
precision, and writes the pipeline as `fraud.joblib` and as ONNX `fraud.onnx`. `recommender`
builds, with the onnx helper API, a graph that looks up a user's embedding and returns the top-k
items by dot product with the item embeddings (`user_id` INT64 [-1] -> `scores` FP32 [-1, k],
`items` INT64 [-1, k]). Both return the gateway config that serves what they wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferd.classic.loader import require, sklearn_to_onnx

FRAUD_FEATURES = 20


@dataclass(frozen=True)
class Example:
    directory: Path
    files: tuple[Path, ...]
    config: dict       # the gateway config (YAML) that serves it
    report: str        # what was made, in a few lines


def fraud_data(n_samples: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic transactions: 20 float32 features, label 1 (fraud) for about 1.5% of them."""
    datasets = require("sklearn.datasets")
    x, y = datasets.make_classification(n_samples=n_samples, n_features=FRAUD_FEATURES, n_informative=8,
                                        n_redundant=4, n_clusters_per_class=3, weights=[0.985], flip_y=0.002,
                                        class_sep=1.0, random_state=seed)
    return x.astype(np.float32), y


def train_fraud(x: np.ndarray, y: np.ndarray, n_estimators: int = 100, seed: int = 0):
    """A StandardScaler + GradientBoostingClassifier pipeline fitted on (x, y)."""
    ensemble, pipeline, preprocessing = (require("sklearn.ensemble"), require("sklearn.pipeline"),
                                         require("sklearn.preprocessing"))
    model = pipeline.make_pipeline(preprocessing.StandardScaler(),
                                   ensemble.GradientBoostingClassifier(n_estimators=n_estimators, max_depth=3,
                                                                       random_state=seed))
    return model.fit(x, y)


def fraud(directory: str | Path, n_samples: int = 20_000, n_estimators: int = 100, seed: int = 0) -> Example:
    joblib, metrics, selection = require("joblib"), require("sklearn.metrics"), require("sklearn.model_selection")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    x, y = fraud_data(n_samples, seed)
    x_train, x_test, y_train, y_test = selection.train_test_split(x, y, test_size=0.25, stratify=y,
                                                                  random_state=seed)
    model = train_fraud(x_train, y_train, n_estimators, seed)
    scores = model.predict_proba(x_test)[:, 1]
    pickled, exported = directory / "fraud.joblib", directory / "fraud.onnx"
    joblib.dump(model, pickled)
    exported.write_bytes(sklearn_to_onnx(model, "the fraud model"))
    report = (f"trained on {len(y_train)} transactions ({y.mean():.2%} fraud); holdout ROC AUC "
              f"{metrics.roc_auc_score(y_test, scores):.3f}, average precision "
              f"{metrics.average_precision_score(y_test, scores):.3f}")
    config = {"models": [{"name": "fraud", "price": {"per_1k_predictions": 0.01}, "deployments": [
        {"provider": "onnx", "model": str(exported), "max_batch_size": 64, "max_queue_delay_microseconds": 200}]}]}
    return Example(directory, (pickled, exported), config, report)


def recommender_graph(users: np.ndarray, items: np.ndarray, k: int):
    """An ONNX model: user_id -> the k items with the highest dot product with that user's embedding."""
    onnx = require("onnx")
    helper, numpy_helper, tp = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    if not 1 <= k <= len(items):
        raise ValueError(f"k must be between 1 and the number of items ({len(items)}), got {k}")
    nodes = [
        helper.make_node("Gather", ["user_embeddings", "user_id"], ["user"], axis=0),
        helper.make_node("MatMul", ["user", "item_embeddings_t"], ["all_scores"]),
        helper.make_node("TopK", ["all_scores", "k"], ["scores", "items"], axis=1, largest=1, sorted=1),
    ]
    initializers = [numpy_helper.from_array(users.astype(np.float32), "user_embeddings"),
                    numpy_helper.from_array(np.ascontiguousarray(items.T, dtype=np.float32), "item_embeddings_t"),
                    numpy_helper.from_array(np.array([k], dtype=np.int64), "k")]
    graph = helper.make_graph(nodes, "recommender", [helper.make_tensor_value_info("user_id", tp.INT64, ["batch"])],
                              [helper.make_tensor_value_info("scores", tp.FLOAT, ["batch", k]),
                               helper.make_tensor_value_info("items", tp.INT64, ["batch", k])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="inferd")
    onnx.checker.check_model(model)
    return model


def embeddings(n_users: int, n_items: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length user and item embeddings drawn around a few shared tastes, so top-k lists mean something."""
    rng = np.random.default_rng(seed)
    tastes = rng.normal(size=(16, dim))
    def around(n):
        v = tastes[rng.integers(0, len(tastes), n)] + 0.5 * rng.normal(size=(n, dim))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return around(n_users), around(n_items)


def recommender(directory: str | Path, n_users: int = 1000, n_items: int = 10_000, dim: int = 32, k: int = 10,
                seed: int = 0) -> Example:
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    users, items = embeddings(n_users, n_items, dim, seed)
    path = directory / "recommender.onnx"
    path.write_bytes(recommender_graph(users, items, k).SerializeToString())
    config = {"models": [{"name": "recommender", "price": {"per_1k_predictions": 0.002}, "deployments": [
        {"provider": "onnx", "model": str(path), "max_batch_size": 64, "max_queue_delay_microseconds": 200}]}]}
    report = f"{n_users} users and {n_items} items as {dim}-d embeddings; top {k} items by dot product"
    return Example(directory, (path,), config, report)
