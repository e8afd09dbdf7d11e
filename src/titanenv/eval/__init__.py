"""Evaluation of trained models: validation loss, the lm-eval matrix, generation.

The model of a run is rebuilt by :mod:`titanenv.train.model`; this package scores it. The names
below load their module on first use (PEP 562): ``titanenv --help`` and the core install, which
has no torch, import this package through the CLI. (``generate`` is the submodule
:mod:`titanenv.eval.generate`; its greedy ``generate`` function is imported from there.)
"""

from __future__ import annotations

from titanenv import lazy

_WHERE = {
    "titanenv.eval.generate": ("ModelNotFound", "generate_text", "read_prompts"),
    "titanenv.eval.loss": ("EVAL_FILE", "EvalResult", "evaluate", "validation_loss"),
    "titanenv.eval.matrix": ("MatrixConfig", "MatrixResults", "run_matrix"),
    "titanenv.train.model": ("RunRecord", "latest_checkpoint", "load_model", "read_run_record"),
}
__all__, __getattr__ = lazy.attributes(__name__, _WHERE, globals())
