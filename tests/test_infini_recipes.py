"""Infini-attention wired into training: the recipes, the trainer's config checks, gate logging, reload.

The Infini recipes are compared with their baselines field by field (fair by construction); the
optimizer TorchTitan builds for them is read back; one tiny CPU run of ``titanenv_debug_infini``
(seq-len 64, batch 2, 3 steps, ``--infini.segment-len 16``, ``--attn-backend sdpa``) is trained
through ``titanenv.train.cli.train`` and its TensorBoard gates, ``status.json`` and reloaded model
are checked.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runs import SAMPLE, TOKENIZERS, output_to
from titanenv import export
from titanenv.data import preprocess as pp
from titanenv.train import checkpoints, cli, trainer
from titanenv.train.infini import GATE_PATTERN, InfiniAttention, InfiniConfig, InfiniOptions
from titanenv.train.job import RECIPE_SEQ_LEN
from titanenv.train.model import load_model, read_run_record
from titanenv.train.recipes import load_recipe, recipe_names
from titanenv.train.vocab import set_vocab_size

PAIRS = [("titanenv_debug", "titanenv_debug_infini"), ("titanenv_1b", "titanenv_1b_infini")]
SEQ_LEN, SEGMENT, STEPS = 64, 16, 3


def _same_callable(a: Any, b: Any) -> bool:
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return _same_callable(a.func, b.func) and a.args == b.args and a.keywords == b.keywords
    return getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None) is not None


def walk(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where the config trees ``a`` and ``b`` differ; an attention config turned Infini counts as
    ``PATH (class)`` plus ``PATH.infini`` and is compared on its other fields."""
    if isinstance(b, InfiniAttention.Config) and not isinstance(a, InfiniAttention.Config):
        fields = [f.name for f in dataclasses.fields(a)]
        return [f"{path} (class)", f"{path}.infini"] + [
            d for n in fields for d in walk(getattr(a, n), getattr(b, n), f"{path}.{n}")
        ]
    if type(a) is not type(b):
        return [f"{path} (type)"]
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return [
            d for f in dataclasses.fields(a) for d in walk(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
        ]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in walk(x, y, f"{path}[{i}]")]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path} (keys)"]
        return [d for k in a for d in walk(a[k], b[k], f"{path}[{k!r}]")]
    if callable(a):
        return [] if _same_callable(a, b) else [f"{path} (callable)"]
    return [] if a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)) else [path]


@pytest.mark.parametrize(("base_name", "infini_name"), PAIRS)
def test_infini_recipe_is_its_baseline_plus_infini(base_name: str, infini_name: str) -> None:
    base, inf = load_recipe(base_name), load_recipe(infini_name)
    assert walk(base, inf) == [".recipe", ".infini.segment_len"]  # the other options: defaults
    assert inf.infini == InfiniOptions(segment_len=base.training.seq_len // 16, gate_lr=1e-2, gate_weight_decay=0.0)
    assert not base.infini.enabled

    trainer._add_infini(inf)  # what TitanenvTrainer.__init__ does to the config
    trainer._add_infini(inf)  # idempotent
    layers = [f".model_spec.model.layers[{i}].attention" for i in range(len(base.model_spec.model.layers))]
    allowed = {".recipe", ".infini.segment_len", ".optimizer.param_groups (length)"}
    allowed |= {f"{p}{s}" for p in layers for s in (" (class)", ".infini")}
    assert set(walk(base, inf)) == allowed
    gate, *rest = inf.optimizer.param_groups
    assert walk(base.optimizer.param_groups, rest) == []
    assert gate.pattern == GATE_PATTERN and gate.optimizer_name == rest[0].optimizer_name
    assert gate.optimizer_kwargs == {**rest[0].optimizer_kwargs, "lr": 1e-2, "weight_decay": 0.0}
    assert {a.infini for _, a, _, _ in inf.model_spec.model.traverse(InfiniAttention.Config)} == {inf.infini.config()}


def test_recipe_names_and_seq_lens() -> None:
    for _, name in PAIRS:
        assert name in recipe_names()
        assert load_recipe(name).training.seq_len == RECIPE_SEQ_LEN[name]


def test_built_optimizer_holds_the_gates_in_their_own_group() -> None:
    config = load_recipe("titanenv_debug_infini")
    set_vocab_size(config, 2048)
    trainer._add_infini(config)
    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    groups = [g for opt in config.optimizer.build(model_parts=[model]) for g in opt.param_groups]
    gate = next(g for g in groups if any(n.endswith("attention.gate") for n in g["param_names"]))
    assert gate["param_names"] == [f"layers.{i}.attention.gate" for i in range(6)]
    assert (gate["lr"], gate["weight_decay"]) == (1e-2, 0.0)
    others = [n for g in groups if g is not gate for n in g["param_names"]]
    assert not any(n.endswith(".gate") for n in others) and all(
        g["weight_decay"] == 0.1 for g in groups if g is not gate
    )


@pytest.mark.parametrize("value", [None, "missing"])
def test_weight_decay_must_be_set_in_every_group(value: str | None) -> None:
    config = load_recipe("titanenv_debug")
    kwargs = config.optimizer.param_groups[0].optimizer_kwargs
    if value is None:
        kwargs["weight_decay"] = None
    else:
        del kwargs["weight_decay"]
    state = "is None" if value is None else "is missing"
    with pytest.raises(ValueError, match=re.escape(f"optimizer.param_groups[0] (pattern '.*', AdamW): "
                                                   f"optimizer_kwargs['weight_decay'] {state}")):  # fmt: skip
        config.build()  # refused before the tokenizer is even read


def test_infini_config_errors_name_the_flag() -> None:
    config = load_recipe("titanenv_debug_infini")
    config.lora.rank = 8
    with pytest.raises(ValueError, match=r"--infini.segment-len 32 with --lora.rank 8: not supported"):
        trainer.check_config(config)
    with pytest.raises(ValueError, match=r"--infini.gate-lr -1.0: must be >= 0"):
        InfiniOptions(segment_len=4, gate_lr=-1.0).config()
    with pytest.raises(ValueError, match=r"--infini.update 'fast'"):
        InfiniOptions(segment_len=4, update="fast").config()  # type: ignore[arg-type]
    config = load_recipe("titanenv_debug_infini")
    config.parallelism.tensor_parallel_degree = 2
    with pytest.raises(ValueError, match=r"--parallelism.tensor-parallel-degree 2: Infini-attention supports"):
        trainer.check_config(config)


def test_attention_backend_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    trainer.check_config(load_recipe("titanenv_debug"))
    config = load_recipe("titanenv_debug")
    config.attn_backend = "sdpa"
    trainer.check_config(config)
    assert config.dataloader.document_positions is False
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    assert lines == ["attention: sdpa (no CUDA)", "attention: sdpa (--attn-backend sdpa)"]
    config.attn_backend = "flex"
    with pytest.raises(ValueError, match="--attn-backend flex: FlexAttention needs CUDA"):
        trainer.check_config(config)


def test_fused_adam(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    config = load_recipe("titanenv_debug")
    config.fused_adam = True
    trainer.check_config(config)
    assert "fused" not in config.optimizer.param_groups[0].optimizer_kwargs
    assert "--fused-adam is ignored on CPU (no CUDA): --optimizer.implementation decides" in caplog.messages
    monkeypatch.setattr(trainer.cpu, "cpu_only", lambda: False)  # the CUDA branch, without CUDA
    trainer._resolve_fused_adam(config)
    assert config.optimizer.param_groups[0].optimizer_kwargs | {"fused": True, "foreach": False} == (
        config.optimizer.param_groups[0].optimizer_kwargs
    )


# -- one tiny CPU training run


@pytest.fixture(scope="module")
def infini_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(run folder, train.log)`` of 3 CPU steps of ``titanenv_debug_infini`` (4 segments of 16 tokens)."""
    root = tmp_path_factory.mktemp("infini-run")
    data = root / "data" / "train"
    pp.run(pp.PreprocessConfig(inputs=sorted(SAMPLE.glob("c4-sample.*.json.gz")), output_prefix=data,
                               tokenizer_model=str(TOKENIZERS["test"]), append_eod=True))  # fmt: skip
    run_dir, log = root / "run", root / "train.log"
    with output_to(log):
        cli.train(
            data=data,
            tokenizer=TOKENIZERS["test"],
            output_dir=run_dir,
            recipe="titanenv_debug_infini",
            steps=STEPS,
            seq_len=SEQ_LEN,
            batch_size=2,
            checkpoint_interval=1000,
            preflight=False,
            extra=["--debug.seed", "0", "--infini.segment-len", str(SEGMENT), "--attn-backend", "sdpa"],
        )
    assert checkpoints.complete_steps(run_dir / "checkpoint") == [STEPS], log.read_text()[-3000:]
    return run_dir, log


def _tb(run_dir: Path) -> EventAccumulator:
    (folder,) = sorted((run_dir / "tb").iterdir())
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_training_logs_gates_to_tensorboard_and_status(infini_run: tuple[Path, Path]) -> None:
    run_dir, log = infini_run
    text = log.read_text()
    assert (
        f"attention: infini, local softmax by sdpa inside {SEGMENT}-token segments (causal; the recipe's sdpa "
        "is unused) plus compressive memory (--attn-backend sdpa)"
    ) in text
    assert f"Infini-attention: 4 segments of {SEGMENT} tokens per {SEQ_LEN}-token sample" in text
    (gate_line,) = [line for line in text.splitlines() if f"[{GATE_PATTERN}]" in line]
    assert "6 params" in gate_line and "'lr': 0.01" in gate_line and "'weight_decay': 0.0" in gate_line

    acc = _tb(run_dir)
    scalars = set(acc.Tags()["scalars"])
    heads = {f"infini/gate/layers.{i}/head{h}" for i in range(6) for h in range(16)}
    assert heads <= scalars and {f"infini/gate_mean/layers.{i}" for i in range(6)} <= scalars
    assert [e.step for e in acc.Scalars("infini/gate/layers.0/head0")] == [1, 2, 3]  # log_freq 1
    assert "infini/gates" in acc.Tags()["histograms"]
    last = {t: acc.Scalars(t)[-1].value for t in heads}
    assert all(0 < v < 1 for v in last.values()) and any(abs(v - 0.5) > 1e-4 for v in last.values())  # they train
    head0 = [last[f"infini/gate/layers.0/head{h}"] for h in range(16)]
    assert acc.Scalars("infini/gate_mean/layers.0")[-1].value == pytest.approx(sum(head0) / 16, abs=1e-6)

    (status_file,) = run_dir.glob("**/status.json")
    status = json.loads(status_file.read_text())
    assert status["state"] == "completed" and status["infini"]["segment_len"] == SEGMENT
    assert status["infini"]["gates"]["layers.0"] == pytest.approx(head0, abs=1e-6)
    assert sorted(status["infini"]["gate_mean"]) == [f"layers.{i}" for i in range(6)]


def test_infini_run_reloads_and_refuses_export(infini_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, _ = infini_run
    record = read_run_record(run_dir)
    assert record.infini == InfiniConfig(segment_len=SEGMENT, gate_lr=1e-2, gate_weight_decay=0.0)
    model, _, step, _ = load_model(run_dir)
    assert step == STEPS
    attns = [m for m in model.modules() if isinstance(m, InfiniAttention)]
    assert len(attns) == 6 and all(a.infini.segment_len == SEGMENT for a in attns)
    (status_file,) = run_dir.glob("**/status.json")
    trained = json.loads(status_file.read_text())["infini"]["gates"]["layers.0"]
    assert torch.sigmoid(attns[0].gate).tolist() == pytest.approx(trained, abs=1e-6)  # the trained gates, loaded
    with torch.no_grad():
        logits = model(torch.randint(0, 2000, (1, SEQ_LEN)))
    assert logits.shape == (1, SEQ_LEN, record.vocab_size) and torch.isfinite(logits).all()

    with pytest.raises(export.ExportRefused, match=r"an Infini-attention run .*layers\.\*\.attention\.gate"):
        export.export_run(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
