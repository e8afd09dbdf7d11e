"""Evaluation of trained models: validation loss, the lm-eval matrix, generation.

The model of a run is rebuilt by :mod:`titanenv.train.model`; this package scores it.
"""

from __future__ import annotations

from titanenv.eval.generate import ModelNotFound, generate, generate_text, read_prompts
from titanenv.eval.loss import EVAL_FILE, EvalResult, evaluate, validation_loss
from titanenv.eval.matrix import MatrixConfig, MatrixResults, run_matrix
from titanenv.train.model import RunRecord, latest_checkpoint, load_model, read_run_record

__all__ = [
    "EVAL_FILE",
    "EvalResult",
    "MatrixConfig",
    "MatrixResults",
    "ModelNotFound",
    "RunRecord",
    "evaluate",
    "generate",
    "generate_text",
    "latest_checkpoint",
    "load_model",
    "read_prompts",
    "read_run_record",
    "run_matrix",
    "validation_loss",
]
