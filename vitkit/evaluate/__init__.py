"""Evaluation and prediction: dataset metrics (top-1/top-5, per-class accuracy, confusion matrix), top-k predictions
for image files, and the inference preprocessing both rely on. ``explain`` (attention maps) and ``export`` live
beside them. Importing this package does no work; heavy pieces (datasets, matplotlib) load on use."""
from vitkit.evaluate.labels import imagenet_class_names, resolve_class_names
from vitkit.evaluate.metrics import EvalResult, evaluate, result_from_logits, save_eval_artifacts
from vitkit.evaluate.predict import Prediction, expand_inputs, predict_files
from vitkit.evaluate.preprocess import eval_transform
from vitkit.evaluate.targets import Target, load_target
from vitkit.evaluate.tta import TTA_MODES, FlipAverage, with_tta

__all__ = ["eval_transform", "EvalResult", "evaluate", "result_from_logits", "save_eval_artifacts", "Prediction",
           "predict_files", "expand_inputs", "imagenet_class_names", "resolve_class_names", "Target", "load_target",
           "TTA_MODES", "FlipAverage", "with_tta"]
