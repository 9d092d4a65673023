"""A model file to ONNX bytes: `.onnx` as it is, a pickled/joblib scikit-learn model converted.

A scikit-learn estimator or pipeline (preprocessing included) is converted with skl2onnx at load:
one float32 input named `input` of shape [-1, n_features_in_]; a classifier's outputs are `label`
and `probabilities` (a plain tensor, not skl2onnx's default list of dicts), a regressor's is
`variable`. LightGBM estimators (alone or ending a pipeline) convert too when lightgbm and
onnxmltools are installed. Unpickling runs code from the file: serve only model files you trust.
"""

from __future__ import annotations

import importlib
from pathlib import Path

ONNX_SUFFIXES = (".onnx",)
SKLEARN_SUFFIXES = (".pkl", ".pickle", ".joblib")


def require(module: str):
    """Import a module of the classic-ml extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"tensor models (provider: onnx) need the package {module.split('.')[0]!r}; "
                         "install the extra: pip install 'inferd[classic-ml]'") from None


def onnx_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"the model file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return path.read_bytes()
    if suffix in SKLEARN_SUFFIXES:
        joblib = require("joblib")
        try:
            model = joblib.load(path)
        except Exception as e:  # noqa: BLE001 - whatever the unpickler raises, say which file
            raise ValueError(f"cannot load the scikit-learn model {path}: {e}") from None
        return sklearn_to_onnx(model, str(path))
    raise ValueError(f"{path}: unknown model file type {suffix!r}; allowed: "
                     f"{', '.join(ONNX_SUFFIXES + SKLEARN_SUFFIXES)}")


def sklearn_to_onnx(model, source: str = "the model") -> bytes:
    """ONNX bytes of a fitted scikit-learn estimator or pipeline."""
    skl2onnx = require("skl2onnx")
    data_types = require("skl2onnx.common.data_types")
    base = require("sklearn.base")
    n_features = getattr(model, "n_features_in_", None)
    if not isinstance(n_features, int):
        raise ValueError(f"{source}: not a fitted scikit-learn model (it has no n_features_in_)")
    options = {"zipmap": False} if base.is_classifier(model) else None
    opset = None
    if _is_lightgbm(model):
        _register_lightgbm()
        opset = {"": skl2onnx.get_latest_tested_opset_version(), "ai.onnx.ml": 3}  # onnxmltools' newest
    try:
        onx = skl2onnx.to_onnx(model, initial_types=[("input", data_types.FloatTensorType([None, n_features]))],
                               options=options, target_opset=opset)
    except Exception as e:  # noqa: BLE001 - unsupported estimators raise many kinds
        raise ValueError(f"{source}: skl2onnx cannot convert {type(model).__name__}: {str(e)[:300]}") from None
    return onx.SerializeToString()


def _is_lightgbm(model) -> bool:
    last = model.steps[-1][1] if hasattr(model, "steps") else model
    return type(last).__module__.split(".")[0] == "lightgbm"


def _register_lightgbm() -> None:
    """Teach skl2onnx LightGBM's estimators, with onnxmltools' converter."""
    lightgbm = require("lightgbm")
    converter = require("onnxmltools.convert.lightgbm.operator_converters.LightGbm").convert_lightgbm
    skl2onnx, shapes = require("skl2onnx"), require("skl2onnx.common.shape_calculator")
    skl2onnx.update_registered_converter(lightgbm.LGBMClassifier, "LightGbmLGBMClassifier",
                                         shapes.calculate_linear_classifier_output_shapes, converter,
                                         options={"nocl": [True, False], "zipmap": [True, False, "columns"]})
    skl2onnx.update_registered_converter(lightgbm.LGBMRegressor, "LightGbmLGBMRegressor",
                                         shapes.calculate_linear_regressor_output_shapes, converter)
