"""Export stage: a titanenv run's checkpoint as a Hugging Face ``LlamaForCausalLM`` folder.

``titanenv export RUN_DIR [--step N] [--out DIR] [--dtype float32|bfloat16]``, or from Python::

    from titanenv.export import cached_export, export_run

    hf_dir = cached_export(run_dir)            # RUN/export/step-N, written once, then reused
    result = export_run(run_dir, "out/", step=100, dtype="bfloat16")

The folder: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json`` above 5 GB), ``tokenizer.json``, ``tokenizer_config.json``
(loads offline with ``AutoTokenizer``; adds no BOS, as training never saw one), ``README.md``
(the run's provenance, redacted) and the completion marker ``titanenv-export.json``. Weights
are renamed by TorchTitan's own ``Llama3StateDictAdapter``; any state it would drop stops the
export with :class:`ExportRefused`. Logits of the folder under ``transformers`` match TorchTitan's
(tests/test_export.py). See :mod:`titanenv.export.convert` and :mod:`titanenv.export.folder`.
"""

from __future__ import annotations

from titanenv import lazy

# The names load their module on first use (PEP 562): the CLI imports this package, and the core
# install has no torch.
_WHERE = {
    "titanenv.export.convert": ("ExportRefused", "hf_config", "load_state", "resolve_checkpoint", "to_hf"),
    "titanenv.export.folder": ("DTYPES", "MARKER", "ExportResult", "cached_export", "export_dir", "export_run",
                               "is_current"),
}  # fmt: skip
__all__, __getattr__ = lazy.attributes(__name__, _WHERE, globals())
