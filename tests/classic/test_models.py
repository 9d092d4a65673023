"""Models loaded as inferd serves them: scikit-learn converted at load, ONNX graphs as they are,
their signatures, and the checks of a request against them (real ONNX Runtime sessions)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from inferd.classic.session import OnnxModel
from inferd.classic.tensors import InferRequest, RequestedOutput, Tensor, TensorError
from tests.classic.conftest import affine_graph


def request(*tensors: tuple[str, str, np.ndarray], outputs=None) -> InferRequest:
    return InferRequest(None, tuple(Tensor(n, d, a) for n, d, a in tensors), outputs)


def test_sklearn_pipeline_converted_at_load_predicts_as_sklearn(model_dir, fraud_model):
    model, x = fraud_model
    onnx_model = OnnxModel.load(model_dir / "fraud.joblib")
    sig = onnx_model.signature
    assert [s.metadata() for s in sig.inputs] == [{"name": "input", "datatype": "FP32", "shape": [-1, 20]}]
    assert sig.output_names == ("label", "probabilities") and sig.batchable
    out = onnx_model.run({"input": x[:200]})
    np.testing.assert_allclose(out["probabilities"], model.predict_proba(x[:200]), atol=1e-5)
    np.testing.assert_array_equal(out["label"], model.predict(x[:200]))


def test_lightgbm_pipeline_converted_at_load_predicts_as_lightgbm(tmp_path, fraud_model):
    pytest.importorskip("lightgbm")
    pytest.importorskip("onnxmltools")
    import joblib
    from lightgbm import LGBMClassifier, LGBMRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, x = fraud_model
    y = (x[:, 0] + x[:, 3] > 0.5).astype(int)
    classifier = make_pipeline(StandardScaler(), LGBMClassifier(n_estimators=20, verbose=-1)).fit(x, y)
    regressor = LGBMRegressor(n_estimators=20, verbose=-1).fit(x, x[:, 1])
    joblib.dump(classifier, tmp_path / "c.joblib")
    joblib.dump(regressor, tmp_path / "r.joblib")
    out = OnnxModel.load(tmp_path / "c.joblib").run({"input": x[:100]})
    np.testing.assert_allclose(out["probabilities"], classifier.predict_proba(x[:100]), atol=1e-5)
    out = OnnxModel.load(tmp_path / "r.joblib").run({"input": x[:100]})
    np.testing.assert_allclose(out["variable"].ravel(), regressor.predict(x[:100]), rtol=1e-4, atol=1e-4)


def test_session_threads_are_bounded(model_dir):
    onnx_model = OnnxModel.load(model_dir / "affine.onnx", intra_op_num_threads=2)
    options = onnx_model.session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_request_checks_name_the_input(model_dir):
    sig = OnnxModel.load(model_dir / "affine.onnx").signature
    a, b = np.ones((3, 4), np.float32), np.ones((3, 2), np.float32)
    feeds, rows = sig.feeds(request(("a", "FP32", a), ("b", "FP32", b)), "affine")
    assert rows == 3 and set(feeds) == {"a", "b"}
    cases = [
        (request(("a", "FP32", a), ("b", "FP32", b), ("c", "FP32", b)), "unexpected inference input 'c'"),
        (request(("a", "FP32", a)), "expected inference input 'b'"),
        (request(("a", "FP64", a.astype(np.float64)), ("b", "FP32", b)),
         "unexpected datatype FP64 for inference input 'a', expecting FP32"),
        (request(("a", "FP32", np.ones((3, 5), np.float32)), ("b", "FP32", b)),
         "unexpected shape for input 'a' for model 'affine'. Expected [-1, 4], got [3, 5]"),
        (request(("a", "FP32", np.ones(4, np.float32)), ("b", "FP32", b)), "unexpected shape for input 'a'"),
        (request(("a", "FP32", a), ("b", "FP32", np.ones((2, 2), np.float32))),
         "input 'b' has 2 rows but the other inputs have 3"),
    ]
    for req, message in cases:
        with pytest.raises(TensorError) as e:
            sig.feeds(req, "affine")
        assert message in str(e.value)
    with pytest.raises(TensorError, match="unexpected inference output 'z'"):
        sig.requested(request(outputs=(RequestedOutput("z", False),)))


def test_raw_onnx_graph_runs_as_numpy_computes(model_dir):
    _, w = affine_graph()
    a = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    b = np.full((5, 2), 0.5, np.float32)
    out = OnnxModel.load(model_dir / "affine.onnx").run({"a": a, "b": b})
    np.testing.assert_allclose(out["y"], a @ w + b, rtol=1e-5)
    np.testing.assert_allclose(out["n"], a.sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("name, content, message", [
    ("model.txt", b"x", "unknown model file type '.txt'"),
    ("broken.onnx", b"not a model", "ONNX Runtime cannot load"),
    ("broken.joblib", b"not a pickle", "cannot load the scikit-learn model"),
])
def test_bad_model_files_say_what_is_wrong(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        OnnxModel.load(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        OnnxModel.load(tmp_path / "missing.onnx")


def test_unfitted_sklearn_model_is_refused(tmp_path):
    import joblib
    from sklearn.linear_model import LogisticRegression

    joblib.dump(LogisticRegression(), tmp_path / "m.joblib")
    with pytest.raises(ValueError, match="not a fitted scikit-learn model"):
        OnnxModel.load(tmp_path / "m.joblib")


def test_inferd_runs_without_the_extra_and_says_what_to_install():
    """Without onnxruntime & co. inferd still imports and parses onnx configs; loading one says how to fix it."""
    code = """
import sys
for m in ("onnxruntime", "onnx", "skl2onnx", "sklearn"):
    sys.modules[m] = None
import inferd.api.server, inferd.cli.main
inferd.cli.main.build_parser()
from inferd.gateway.config import parse_config
parse_config({"models": [{"name": "m", "deployments": [{"provider": "onnx", "model": "m.onnx"}]}]})
from inferd.classic.session import OnnxModel
try:
    OnnxModel(b"")
except ValueError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "need the package 'onnxruntime'" in out.stdout and "inferd[classic-ml]" in out.stdout
