"""Evaluation of trained models: validation loss, the lm-eval matrix, generation.

The model of a run is rebuilt by :mod:`titanenv.train.model`; this package scores it.
"""

from __future__ import annotations

from titanenv.eval.generate import generate
from titanenv.eval.loss import EVAL_FILE, EvalResult, evaluate, validation_loss
from titanenv.train.model import RunRecord, latest_checkpoint, load_model, read_run_record

__all__ = [
    "EVAL_FILE",
    "EvalResult",
    "RunRecord",
    "evaluate",
    "generate",
    "latest_checkpoint",
    "load_model",
    "read_run_record",
    "validation_loss",
]
