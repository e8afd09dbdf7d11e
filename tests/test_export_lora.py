"""LoRA exports: the merged model and the PEFT adapter against TorchTitan's own LoRA forward (CPU, fp32).

The run folder (fixture ``lora_run``) is the tiny ``titanenv_debug`` run of tests/runs.py turned
into a LoRA fine-tune of its own export: ``trainer_config.json`` gains ``lora`` (r 4, alpha 8, all
targets) and ``checkpoint.initial_load_path`` (the base folder), and its checkpoint is rewritten
with the trained weights as the frozen base plus random non-zero adapters, saved by DCP as
training saves them. ``load_model`` rebuilds TorchTitan's LoRA model from it: the reference.
A 2-layer grouped-query model (4 KV heads for 16 query heads) checks the fused ``wqkv`` split
where Q, K and V rows interleave by KV group.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from conftest import require
from test_eval_matrix import UNSHARE, titanenv_eval
from test_export import hf_model, windows
from titanenv import export
from titanenv.cli import app
from titanenv.eval import matrix
from titanenv.export import lora as xlora
from titanenv.train import checkpoints
from titanenv.train.lora import HF_MODULES, LORA_TARGETS, LoraOptions, convert
from titanenv.train.model import load_model, read_run_record, run_config
from titanenv.train.recipes import use_causal_sdpa

OPTIONS = LoraOptions(rank=4, alpha=8.0)
TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class LoraRun:
    run_dir: Path
    base: Path
    step: int
    ids: torch.Tensor
    """Two training windows of the run's data."""


def randomise_adapters(state: dict[str, torch.Tensor], seed: int) -> None:
    """Non-zero ``lora_a``/``lora_b`` in place (training starts B at zero, which would hide every mistake)."""
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if ".lora_" in key:
            value.copy_(torch.randn(value.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def lora_run(tiny_run, tmp_path_factory) -> LoraRun:
    trained = tiny_run("test")
    root = tmp_path_factory.mktemp("lora")
    base = export.export_run(trained.run_dir, root / "base").out
    run = root / "lora-run"
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export", "checkpoint"))
    cfg_path = run / "trainer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora"] = dataclasses.asdict(OPTIONS)
    cfg.setdefault("checkpoint", {})["initial_load_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg, indent=2))

    plain = export.load_state(trained.run_dir).state
    with torch.device("meta"):
        model = run_config(read_run_record(run)).model_spec.model.build()
    state = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
    assert {k for k in state if ".lora_" not in k} == set(plain)  # the base keys are the plain model's
    for key, value in plain.items():
        state[key].copy_(value)
    randomise_adapters(state, seed=1)
    ckpt = run / "checkpoint" / f"step-{trained.step}"
    dcp.save(state, checkpoint_id=str(ckpt))
    checkpoints.write_marker(ckpt, trained.step)
    return LoraRun(run, base, trained.step, windows(trained))


def titan_logits(run: LoraRun) -> torch.Tensor:
    titan, record, _, _ = load_model(run.run_dir)
    assert record.lora == OPTIONS and record.base_model == run.base
    with torch.no_grad():
        return titan(run.ids)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def adapter_keys(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / xlora.ADAPTER_WEIGHTS, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_merged_export_matches_torchtitans_lora_forward(lora_run, tmp_path):
    result = export.export_run(lora_run.run_dir, tmp_path / "merged", merge=True)
    assert (result.kind, result.base_model) == ("merged", lora_run.base)
    assert json.loads((result.out / export.MARKER).read_text())["kind"] == "merged"
    assert not (result.out / xlora.ADAPTER_CONFIG).exists()
    merged = AutoModelForCausalLM.from_pretrained(result.out, attn_implementation="eager", dtype=torch.float32,
                                                  local_files_only=True).eval()  # fmt: skip
    expected = titan_logits(lora_run)
    assert (logits(merged, lora_run.ids) - expected).abs().max().item() <= TOL
    base_gap = (logits(hf_model(lora_run.base), lora_run.ids) - expected).abs().max().item()
    assert base_gap > 100 * TOL  # the adapters change the model: dropping them would be seen
    readme = (result.out / "README.md").read_text()
    assert f"base model `{lora_run.base}`" in readme and "r 4, alpha 8, dropout 0" in readme


def test_the_peft_adapter_on_its_base_equals_the_merged_model(lora_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = hashlib.sha256((lora_run.base / "model.safetensors").read_bytes()).hexdigest()
    adapter = export.cached_export(lora_run.run_dir)
    assert adapter == lora_run.run_dir / "export" / f"step-{lora_run.step}-adapter"
    assert {p.name for p in adapter.iterdir()} == {xlora.ADAPTER_CONFIG, xlora.ADAPTER_WEIGHTS, "tokenizer.json",
                                                   "tokenizer_config.json", "README.md", export.MARKER}  # fmt: skip
    mark = json.loads((adapter / export.MARKER).read_text())
    assert mark["kind"] == "adapter" and mark["base_model"] == str(lora_run.base) and mark["lora"]["rank"] == 4
    config = json.loads((adapter / xlora.ADAPTER_CONFIG).read_text())
    assert (
        config["base_model_name_or_path"] == str(lora_run.base)
        and Path(config["base_model_name_or_path"]).is_absolute()
    )
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert sorted(config["target_modules"]) == sorted(n for t in LORA_TARGETS for n in HF_MODULES[t])

    tensors = adapter_keys(adapter)
    layers = json.loads((lora_run.base / "config.json").read_text())["num_hidden_layers"]
    assert len(tensors) == 2 * layers * sum(len(HF_MODULES[t]) for t in OPTIONS.target_modules)  # wqkv: 3 modules
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)  # fmt: skip
    attn = "base_model.model.model.layers.0.self_attn"
    assert torch.equal(tensors[f"{attn}.q_proj.lora_A.weight"], tensors[f"{attn}.v_proj.lora_A.weight"])
    assert hashlib.sha256((lora_run.base / "model.safetensors").read_bytes()).hexdigest() == before

    merged_dir = export.cached_export(lora_run.run_dir, merge=True)
    assert merged_dir == lora_run.run_dir / "export" / f"step-{lora_run.step}"
    expected = logits(hf_model(merged_dir), lora_run.ids)
    paired = PeftModel.from_pretrained(hf_model(lora_run.base), adapter).eval()
    assert (logits(paired, lora_run.ids) - expected).abs().max().item() <= TOL
    assert (logits(paired, lora_run.ids) - titan_logits(lora_run)).abs().max().item() <= TOL
    assert (logits(paired.merge_and_unload(), lora_run.ids) - expected).abs().max().item() <= TOL
    readme = (adapter / "README.md").read_text()
    assert "PEFT LoRA adapter" in readme and f'from_pretrained("{lora_run.base}")' in readme


def test_cli_writes_the_adapter_and_says_how_to_load_it(lora_run, tmp_path):
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["export", str(lora_run.run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "LoRA adapter" in result.output and "r 4, alpha 8" in result.output
    assert f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(lora_run.base)!r}), {str(out)!r})" in (
        result.output
    )
    merged = CliRunner().invoke(app, ["export", str(lora_run.run_dir), "--out", str(out), "--merge"])
    assert merged.exit_code == 0 and "replaced the earlier export" in merged.output, merged.output
    assert (out / "config.json").is_file() and not (out / xlora.ADAPTER_CONFIG).exists()
    assert f"merged into base {lora_run.base}" in merged.output


def test_merge_of_a_run_without_lora_is_refused(tiny_run, tmp_path):
    plain = tiny_run("test").run_dir
    with pytest.raises(ValueError, match="not a LoRA run"):
        export.export_run(plain, tmp_path / "out", merge=True)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(app, ["export", str(plain), "--merge"])
    assert result.exit_code == 2 and "not a LoRA run" in result.output


def test_an_adapter_export_needs_the_runs_base(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run.run_dir, run, ignore=shutil.ignore_patterns("export"))
    cfg = json.loads((run / "trainer_config.json").read_text())
    del cfg["checkpoint"]["initial_load_path"]
    (run / "trainer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="without a base model"):
        export.export_run(run, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert export.export_run(run, tmp_path / "merged", merge=True).kind == "merged"


def gqa_lora_model(targets: list[str]) -> tuple[torch.nn.Module, object, object, LoraOptions]:
    """``(TorchTitan LoRA model, its config, the config without LoRA, options)``: 2 layers, 16 heads, 4 KV heads."""
    from torchtitan.models.common.rope import ComplexRoPE
    from torchtitan.models.llama3 import _build_llama3_layers, model_registry

    spec = model_registry("debugmodel", attn_backend="flex")
    rope = ComplexRoPE.Config(dim=16, max_seq_len=64, theta=500000, scaling="none")
    layers = _build_llama3_layers(n_layers=2, dim=256, n_heads=16, n_kv_heads=4, hidden_dim=768, rope=rope,
                                  attn_backend="flex")  # fmt: skip
    spec.model = dataclasses.replace(spec.model, layers=layers)
    use_causal_sdpa(spec)
    options = LoraOptions(rank=4, alpha=6.0, target_modules=targets)
    config = convert(copy.deepcopy(spec.model), options)
    torch.manual_seed(0)
    model = config.build()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.05)
    return model.eval(), config, spec.model, options


def hf_llama(base_config: object, state: dict[str, torch.Tensor], adapter: object) -> LlamaForCausalLM:
    hf_cfg = LlamaConfig(**export.hf_config(base_config, state, 64), attn_implementation="eager")
    model = LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(export.to_hf(adapter, state, tied=False), strict=False)
    assert not unexpected and missing == []
    return model


@pytest.mark.parametrize("targets", [list(LORA_TARGETS), ["wqkv", "w2"]], ids=["all", "wqkv-w2"])
def test_grouped_query_adapters_split_and_permute_like_torchtitan(targets, tmp_path):
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    model, config, base_config, options = gqa_lora_model(targets)
    ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapter = Llama3StateDictAdapter(config, None)
    base_state, adapters = xlora.split(state)
    assert len(adapters) == 2 * 2 * len(targets)  # TorchTitan's side: one A, one B per target Linear

    merged = hf_llama(base_config, xlora.merge(state, config, options), adapter)
    assert (logits(merged, ids) - expected).abs().max().item() <= TOL

    tensors = xlora.peft_state(state, config, adapter, options)
    assert len(tensors) == 2 * 2 * sum(len(HF_MODULES[t]) for t in targets)
    save_file(tensors, str(tmp_path / xlora.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    xlora.write_adapter_config(tmp_path, options, Path("/nowhere/base"))
    base = hf_llama(base_config, base_state, adapter)
    assert (logits(base, ids) - expected).abs().max().item() > 100 * TOL
    paired = PeftModel.from_pretrained(base, tmp_path).eval()
    assert (logits(paired, ids) - expected).abs().max().item() <= TOL


def test_a_lone_adapter_half_is_refused_and_named(lora_run):
    loaded = export.load_state(lora_run.run_dir)
    state = dict(loaded.state)
    del state["layers.1.feed_forward.w2.lora_b.weight"]
    with pytest.raises(export.ExportRefused, match=r"layers\.1\.feed_forward\.w2\.lora_b\.weight"):
        xlora.peft_state(state, loaded.model_config, loaded.adapter, OPTIONS)
    odd = {**loaded.state, "layers.0.attention.wo.lora_a.bias": torch.zeros(4)}
    with pytest.raises(export.ExportRefused, match=r"wo\.lora_a\.bias"):
        xlora.merge(odd, loaded.model_config, OPTIONS)


def test_an_adapter_folder_resolves_to_its_base_and_the_adapter(lora_run, tmp_path):
    adapter = export.cached_export(lora_run.run_dir)
    (ref,) = matrix.resolve_models([adapter])
    assert (ref.label, ref.step, ref.titanenv, ref.hf_dir, ref.peft) == ("lora-run", lora_run.step, True,
                                                                        lora_run.base, adapter)  # fmt: skip
    assert ref.weights_dtype == "float32" and matrix._step_folder(ref, "float32") == f"step-{lora_run.step}-adapter"
    assert matrix._model_name(ref, "float32") == "lora-run (adapter)"
    (from_run,) = matrix.resolve_models([lora_run.run_dir])
    exported = matrix._exported(from_run, "float32", lambda line: None)  # the run exports to its adapter
    assert (exported.hf_dir, exported.peft) == (lora_run.base, adapter)

    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    cfg = json.loads((moved / xlora.ADAPTER_CONFIG).read_text())
    (moved / xlora.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(matrix.ModelNotFound, match="not a local Hugging Face folder"):
        matrix.resolve_models([moved])


def test_the_pair_loads_in_lm_eval_with_the_full_vocabulary(lora_run, monkeypatch):
    """Not through ``HFLM(peft=)``, which shrinks the embedding to the tokenizer's 2,020 tokens."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = export.cached_export(lora_run.run_dir)
    (ref,) = matrix.resolve_models([adapter])
    lm = matrix._load_lm(ref, matrix.MatrixConfig(models=[adapter], batch_size=2))
    assert isinstance(lm.model, PeftModel) and lm.peft == str(adapter) and lm.add_bos_token is False
    assert lm.model.get_output_embeddings().weight.shape[0] == read_run_record(lora_run.run_dir).vocab_size
    assert len(lm.tokenizer) < read_run_record(lora_run.run_dir).vocab_size  # so HFLM(peft=) would have resized
    merged = hf_model(export.cached_export(lora_run.run_dir, merge=True))
    with torch.no_grad():
        assert (lm._model_call(lora_run.ids) - merged(lora_run.ids).logits).abs().max().item() <= TOL


def test_lm_eval_scores_the_adapter_pair_as_the_merged_model_offline(lora_run, tmp_path):
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    adapter = export.cached_export(lora_run.run_dir)
    merged = export.cached_export(lora_run.run_dir, merge=True)
    out = tmp_path / "results"
    p = titanenv_eval("--model", adapter, "--model", merged, "--tasks", "titanenv_wikitext2", "--limit", "2",
                      "--out", out, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    with (out / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "word_perplexity"]
    values = {r["model"]: float(r["value"]) for r in rows}
    assert set(values) == {"lora-run (adapter)", "lora-run"}
    assert math.isclose(values["lora-run (adapter)"], values["lora-run"], rel_tol=1e-4)
    cell = out / "lm_eval" / "lora-run" / f"step-{lora_run.step}-adapter" / "titanenv_wikitext2" / "0shot.json"
    settings = json.loads(cell.read_text())["titanenv"]
    assert settings["hf_dir"] == str(lora_run.base.resolve()) and settings["peft"] == str(adapter.resolve())
    assert settings["add_bos_token"] is False and settings["peft_weights"][0][0] == xlora.ADAPTER_WEIGHTS
