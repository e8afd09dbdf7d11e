"""Infini-attention (titanenv.train.infini) against a naive reference written from arXiv:2404.07143.

The reference below loops over batch, head, segment and token with explicit M and z, and shares
nothing with the module except its projections (qkv_linear, rope, wo). fp64 throughout.
"""

from __future__ import annotations

import math
import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_mask
from torchtitan.components.optimizer import OptimizersContainer, default_adamw
from torchtitan.models.common import ComplexRoPE
from torchtitan.models.common.attention import GQAttention, ScaledDotProductAttention
from torchtitan.models.common.config_utils import make_gqa_config
from torchtitan.models.llama3 import model_registry

from titanenv.train import infini
from titanenv.train.infini import GATE_PATTERN, InfiniAttention, InfiniConfig
from titanenv.train.recipes import use_causal_sdpa

TOL = 1e-10
_INIT = {"weight": partial(nn.init.normal_, std=0.3), "bias": nn.init.zeros_}


def make_attention(n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 8, fuse: bool = True) -> GQAttention:
    """A small baseline GQAttention in fp64 (weights scaled up so the softmax is not flat)."""
    dim = n_heads * head_dim
    cfg = make_gqa_config(
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        wqkv_param_init=_INIT,
        wo_param_init=_INIT,
        inner_attention=ScaledDotProductAttention.Config(),
        rope=ComplexRoPE.Config(dim=head_dim, max_seq_len=64, theta=10000.0),
        fuse_qkv=fuse,
    )
    attn = cfg.build()
    attn.init_states()
    return attn.double()


def make_infini(cfg: InfiniConfig, gate: torch.Tensor | None = None, **kw: int | bool) -> InfiniAttention:
    attn = InfiniAttention.from_attention(make_attention(**kw), cfg)
    if gate is not None:
        with torch.no_grad():
            attn.gate.copy_(gate)
    return attn


def doc_ids_of(positions: torch.Tensor | None, batch: int, seq_len: int) -> list[list[int]]:
    if positions is None:
        return [[0] * seq_len for _ in range(batch)]
    pos = positions.expand(batch, seq_len).tolist()
    out = []
    for row in pos:
        ids, d = [], -1
        for p in row:
            d += p == 0
            ids.append(d)
        out.append(ids)
    return out


def sig(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x + 1, torch.exp(x))  # ELU(x) + 1


def reference(
    attn: InfiniAttention,
    x: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Straight from the equations: per batch, head, segment and token."""
    cfg = attn.infini
    n = cfg.segment_len
    q, k, v = attn.qkv_linear(x)
    rq, rk = attn.rope(q, k, positions)
    batch, seq_len, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    docs = doc_ids_of(positions, batch, seq_len)
    out = torch.zeros(batch, seq_len, n_heads, v.shape[3], dtype=x.dtype)
    for b in range(batch):
        for h in range(n_heads):
            kh = h // group  # KV head repeated to query heads
            gate = torch.sigmoid(attn.gate[h])
            # A_dot: causal softmax inside the segment (and the document, when positions are given)
            local = {}
            for t in range(seq_len):
                s0 = t - t % n
                keys = [j for j in range(s0, t + 1) if docs[b][j] == docs[b][t]]
                scores = torch.stack([rq[b, t, h] @ rk[b, j, kh] for j in keys]) / math.sqrt(head_dim)
                w = torch.softmax(scores, dim=0)
                local[t] = sum(w[i] * v[b, j, kh] for i, j in enumerate(keys))
            # A_mem: one memory per document ("reset") or per row ("carry")
            groups: dict[int, list[int]] = {}
            for t in range(seq_len):
                groups.setdefault(docs[b][t] if cfg.documents == "reset" else 0, []).append(t)
            mem = {}
            for tokens in groups.values():
                m = torch.zeros(head_dim, v.shape[3], dtype=x.dtype)
                z = torch.zeros(head_dim, dtype=x.dtype)
                for s0 in range(0, seq_len, n):
                    seg = [t for t in tokens if s0 <= t < s0 + n]
                    for t in seg:  # retrieve with M_{s-1}
                        sq = sig(q[b, t, h])
                        den = sq @ z
                        mem[t] = (sq @ m) / den if den != 0 else torch.zeros(v.shape[3], dtype=x.dtype)
                    m_new, z_new = m.clone(), z.clone()
                    for t in seg:  # then update with segment s
                        sk = sig(k[b, t, kh])
                        val = v[b, t, kh]
                        if cfg.update == "delta":
                            den = sk @ z
                            val = val - ((sk @ m) / den if den != 0 else 0.0)
                        m_new = m_new + torch.outer(sk, val)
                        z_new = z_new + sk
                    m, z = m_new, z_new
            for t in range(seq_len):
                out[b, t, h] = gate * mem[t] + (1 - gate) * local[t]
    result: torch.Tensor = attn.wo(out.flatten(2))
    return result


def block_causal_mask(seq_len: int, n: int) -> torch.Tensor:
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    return (i // n == j // n) & (j <= i)


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize(
    ("seq_len", "segment_len", "n_heads", "n_kv_heads", "fuse"),
    [(11, 4, 4, 2, True), (12, 4, 4, 4, True), (7, 3, 4, 1, False), (5, 8, 2, 2, True)],
)
def test_module_matches_naive_reference(update, seq_len, segment_len, n_heads, n_kv_heads, fuse):
    torch.manual_seed(0)
    cfg = InfiniConfig(segment_len, update=update)
    attn = make_infini(cfg, torch.randn(n_heads), n_heads=n_heads, n_kv_heads=n_kv_heads, fuse=fuse)
    x = torch.randn(2, seq_len, n_heads * 8, dtype=torch.float64)
    with torch.no_grad():
        got, want = attn(x, None), reference(attn, x)
    assert got.dtype == torch.float64
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("documents", ["reset", "carry"])
@pytest.mark.parametrize("update", ["linear", "delta"])
def test_packed_documents_match_naive_reference(documents, update):
    torch.manual_seed(1)
    # row 0: documents start at 0, 4 (a segment start) and 6 (mid-segment); the last spans 3 segments
    # row 1: starts mid-document (no 0 at first), then documents at 3 and 9
    positions = torch.tensor(
        [
            [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7],
            [5, 6, 7, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4],
        ]
    )
    cfg = InfiniConfig(4, update=update, documents=documents)
    attn = make_infini(cfg, torch.randn(4), n_heads=4, n_kv_heads=2)
    x = torch.randn(2, 14, 32, dtype=torch.float64)
    with torch.no_grad():
        got, want = attn(x, None, positions), reference(attn, x, positions)
    assert (got - want).abs().max() <= TOL


def test_closed_gate_is_block_diagonal_causal_attention():
    torch.manual_seed(2)
    seq_len, n = 13, 4
    attn = make_infini(InfiniConfig(n), torch.full((4,), -30.0))
    x = torch.randn(2, seq_len, 32, dtype=torch.float64)
    q, k, v = attn.qkv_linear(x)
    rq, rk = attn.rope(q, k)
    local = F.scaled_dot_product_attention(
        rq.transpose(1, 2),
        rk.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=block_causal_mask(seq_len, n),
        enable_gqa=True,
    ).transpose(1, 2)
    with torch.no_grad():
        assert (attn(x, None) - attn.wo(local.flatten(2))).abs().max() <= TOL


def test_segment_mask_mod_is_block_diagonal_causal():
    mask = create_mask(infini.segment_mask_mod(4), 1, 1, 10, 10, device="cpu")
    assert torch.equal(mask[0, 0], block_causal_mask(10, 4))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]])
    mask = create_mask(infini.segment_mask_mod(4, docs), 1, 1, 10, 10, device="cpu")
    assert torch.equal(mask[0, 0], block_causal_mask(10, 4) & (docs[0][:, None] == docs[0][None, :]))


@pytest.mark.parametrize("seq_len", [5, 8])
def test_single_segment_is_the_gated_causal_attention(seq_len):
    torch.manual_seed(3)
    gate = torch.randn(4)
    attn = make_infini(InfiniConfig(8), gate)
    x = torch.randn(2, seq_len, 32, dtype=torch.float64)
    q, k, v = attn.qkv_linear(x)
    rq, rk = attn.rope(q, k)
    causal = F.scaled_dot_product_attention(
        rq.transpose(1, 2), rk.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    want = attn.wo(((1 - torch.sigmoid(attn.gate))[:, None] * causal).flatten(2))
    with torch.no_grad():
        assert (attn(x, None) - want).abs().max() <= TOL


def test_delta_rule_keeps_memory_when_values_are_already_retrieved():
    torch.manual_seed(4)
    memory = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    norm = torch.rand(2, 3, 8, dtype=torch.float64) + 0.1
    sigma_k = infini.sigma(torch.randn(2, 5, 3, 8, dtype=torch.float64))
    v = infini.retrieve_memory(sigma_k.unsqueeze(3), memory, norm).squeeze(3)
    new_memory, new_norm = infini.update_memory(memory, norm, sigma_k, v, "delta")
    assert (new_memory - memory).abs().max() <= TOL
    assert (new_norm - (norm + sigma_k.sum(1))).abs().max() <= TOL
    linear_memory, _ = infini.update_memory(memory, norm, sigma_k, v, "linear")
    assert (linear_memory - memory).abs().max() > 1e-3  # the linear rule stores them again


def test_empty_memory_retrieves_zeros():
    sigma_q = infini.sigma(torch.randn(1, 3, 2, 2, 4))
    out = infini.retrieve_memory(sigma_q, torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4))
    assert torch.equal(out, torch.zeros(1, 3, 2, 2, 4))


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_gradient_flows_from_segment_three_to_segment_one(update):
    torch.manual_seed(5)
    n = 4
    attn = make_infini(InfiniConfig(n, update=update))
    x = torch.randn(1, 3 * n, 32, dtype=torch.float64, requires_grad=True)
    attn(x, None)[:, 2 * n :].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad[:, :n].abs().sum() > 0  # only the memory links segment 3 to segment 1
    assert attn.gate.grad is not None and attn.gate.grad.abs().sum() > 0


def test_memory_is_float32_for_low_precision_inputs():
    q, k, v = (torch.randn(1, 6, 2, 4, dtype=torch.bfloat16) for _ in range(3))
    assert infini.memory_attention(q, k, v, 2).dtype == torch.float32
    attn = make_infini(InfiniConfig(4)).bfloat16()  # parameters only; the complex RoPE cache stays
    assert attn(torch.randn(1, 6, 32, dtype=torch.bfloat16), None).dtype == torch.bfloat16


def test_config_names_the_bad_knob():
    with pytest.raises(ValueError, match="segment_len"):
        InfiniConfig(0)
    with pytest.raises(ValueError, match="update"):
        InfiniConfig(4, update="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="documents"):
        InfiniConfig(4, documents="drop")  # type: ignore[arg-type]


def debug_model() -> nn.Module:
    """TorchTitan's llama3 debugmodel on CPU (causal SDPA), built on meta and initialised as trainers do."""
    spec = model_registry("debugmodel", attn_backend="flex")
    use_causal_sdpa(spec)
    with torch.device("meta"):
        model = spec.model.build()
    return model


def materialise(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


def test_apply_infini_on_llama3_debug_model_loads_baseline_weights_and_trains():
    baseline = materialise(debug_model(), seed=0)
    model = debug_model()
    cfg = InfiniConfig(16, gate_init=-30.0)
    replaced = infini.apply_infini(model, cfg)
    n_layers = len(replaced)
    assert replaced == [f"layers.{i}.attention" for i in range(n_layers)] and n_layers == 6
    materialise(model, seed=1)
    assert all(
        torch.equal(g, torch.full((16,), -30.0)) for g in (m.gate for m in model.modules() if hasattr(m, "infini"))
    )

    missing, unexpected = model.load_state_dict(baseline.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(f"{fqn}.gate" for fqn in replaced)
    assert set(model.state_dict()) == set(baseline.state_dict()) | {f"{fqn}.gate" for fqn in replaced}

    tokens = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():  # one segment, closed gate: the baseline's causal attention
        assert (model(tokens) - baseline(tokens)).abs().max() < 1e-4

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, InfiniAttention):
                m.gate.zero_()
    tokens = torch.randint(0, 2048, (2, 40))  # 2.5 segments
    positions = torch.tensor([list(range(25)) + list(range(15))] * 2)
    for pos in (None, positions):
        model.zero_grad()
        logits = model(tokens, pos)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
        assert torch.isfinite(loss)
        gate = model.layers["0"].attention.gate
        assert gate.grad is not None and gate.grad.abs().sum() > 0
    values = infini.gate_values(model)
    assert list(values) == replaced
    assert all(torch.equal(v, torch.full((16,), 0.5)) for v in values.values())


def test_converted_config_builds_the_same_model():
    cfg = InfiniConfig(8, update="delta", gate_init=0.5)
    spec = model_registry("debugmodel", attn_backend="flex", converters=[infini.InfiniConverter.Config(infini=cfg)])
    use_causal_sdpa(spec)
    with torch.device("meta"):
        built = spec.model.build()
    assert all(isinstance(layer.attention, InfiniAttention) for layer in built.layers.values())
    built = materialise(built, seed=2)
    swapped = debug_model()
    infini.apply_infini(swapped, cfg)
    swapped = materialise(swapped, seed=3)
    swapped.load_state_dict(built.state_dict())  # strict: the same keys, gates included
    assert torch.equal(built.layers["5"].attention.gate, torch.full((16,), 0.5))
    tokens = torch.randint(0, 2048, (1, 20))
    with torch.no_grad():
        assert torch.equal(built(tokens), swapped(tokens))
    with pytest.raises(ValueError, match="no GQAttention.Config"):
        infini.infini_model_config(spec.model, cfg)  # already converted


def test_apply_infini_refuses_a_model_without_attention():
    with pytest.raises(ValueError, match="no GQAttention"):
        infini.apply_infini(nn.Linear(2, 2), InfiniConfig(4))


def test_gate_param_group_goes_first_and_claims_only_the_gates():
    cfg = InfiniConfig(16, gate_lr=3e-2, gate_weight_decay=0.0)
    optimizer = infini.with_gate_param_group(default_adamw(lr=8e-4, weight_decay=0.1), cfg)
    first, rest = optimizer.param_groups[0], optimizer.param_groups[1:]
    assert first.pattern == GATE_PATTERN and first.optimizer_name == "AdamW"
    assert first.optimizer_kwargs["lr"] == 3e-2 and first.optimizer_kwargs["weight_decay"] == 0.0
    assert first.optimizer_kwargs["betas"] == (0.9, 0.95)
    assert [g.pattern for g in rest] == [".*"] and rest[0].optimizer_kwargs["lr"] == 8e-4
    assert infini.with_gate_param_group(optimizer, cfg).param_groups == optimizer.param_groups  # idempotent
    for name in ("layers.3.attention.gate", "layers.3._checkpoint_wrapped_module.attention.gate"):
        assert re.search(GATE_PATTERN, name)
    assert not re.search(GATE_PATTERN, "layers.3.attention.wo.weight")

    model = debug_model()
    infini.apply_infini(model, cfg)
    materialise(model, seed=0)
    optimizer.implementation = "for-loop"
    container = OptimizersContainer(optimizer, model_parts=[model])
    groups = container.optimizers[0].param_groups
    assert sorted(groups[0]["param_names"]) == sorted(f"layers.{i}.attention.gate" for i in range(6))
    assert groups[0]["lr"] == 3e-2 and groups[1]["lr"] == 8e-4
    assert len(groups[1]["params"]) == len(list(model.parameters())) - 6
