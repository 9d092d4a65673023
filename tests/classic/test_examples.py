"""`inferd examples fraud | recommender`: models made offline that serve from the config they print."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from inferd.classic.examples import embeddings, recommender_graph
from inferd.classic.session import OnnxModel
from inferd.gateway.config import parse_config
from tests.api.conftest import ROOT


def run_cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "inferd.cli", "examples", *args], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_fraud_example_trains_exports_and_prints_its_config(tmp_path):
    printed = run_cli("fraud", "--out", str(tmp_path), "--samples", "3000", "--estimators", "10")
    assert "holdout ROC AUC" in printed
    config = parse_config(yaml.safe_load(printed))
    assert config == parse_config(yaml.safe_load((tmp_path / "inferd.yaml").read_text()))
    spec = config.models[0].deployments[0]
    assert spec.provider == "onnx" and spec.model == str(tmp_path / "fraud.onnx")
    import joblib

    pipeline = joblib.load(tmp_path / "fraud.joblib")
    x = np.random.default_rng(2).normal(size=(64, 20)).astype(np.float32)
    out = OnnxModel.load(tmp_path / "fraud.onnx").run({"input": x})
    np.testing.assert_allclose(out["probabilities"], pipeline.predict_proba(x), atol=1e-5)


def test_recommender_graph_is_the_dot_product_top_k(tmp_path):
    printed = run_cli("recommender", "--out", str(tmp_path), "--users", "20", "--items", "300", "--dim", "8",
                      "--k", "4")
    assert parse_config(yaml.safe_load(printed)).models[0].name == "recommender"
    users, items = embeddings(20, 300, 8, seed=0)
    out = OnnxModel.load(tmp_path / "recommender.onnx").run({"user_id": np.array([0, 7, 19])})
    scores = users[[0, 7, 19]] @ items.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(out["items"], expected)
    np.testing.assert_allclose(out["scores"], np.take_along_axis(scores, expected, axis=1), rtol=1e-5)
    assert out["items"].dtype == np.int64 and out["scores"].dtype == np.float32


def test_recommender_refuses_a_k_larger_than_the_catalogue():
    users, items = embeddings(2, 3, 4)
    with pytest.raises(ValueError, match=r"k must be between 1 and the number of items \(3\)"):
        recommender_graph(users, items, 4)
