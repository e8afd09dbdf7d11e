"""Infini-attention for TorchTitan's llama3: segment-local softmax attention plus a compressive memory.

Source: Munkhdalai, Faruqui and Gopal, "Leave No Context Behind: Efficient Infinite Context
Transformers with Infini-attention", 2024, arXiv:2404.07143 (equations cited as "paper eq. N");
checked against nanotron's ``infini_attention`` branches and the Hugging Face post-mortem
"A failed experiment: Infini-Attention, and why we should keep trying?".

Per layer and head, the sequence is cut into segments of ``N = segment_len`` tokens
(the last one may be shorter). For segment ``s``:

* ``A_dot``: causal softmax attention inside the segment (RoPE applied), see :func:`segment_attention`;
* ``A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1})`` with ``σ(x) = ELU(x) + 1`` on the PRE-RoPE q/k (eq. 3);
  the empty memory of the first segment (0/0) retrieves zeros, as public code does;
* memory update after retrieval (eq. 4, "linear"; eq. 5, "delta"), ``z_s = z_{s-1} + Σ_t σ(K_t)``;
* ``A = sigmoid(β) A_mem + (1 - sigmoid(β)) A_dot`` with one learned ``β`` per query head (eq. 6).

``M`` and ``z`` are kept in fp32 (fp64 for fp64 inputs) and stay in the autograd graph, so the loss
of a late segment reaches the q/k/v of every earlier one (no truncated backprop).

GQA: the memory is stored once per KV head. ``M`` and ``z`` depend only on ``K`` and ``V`` (for
both rules), so the per-query-head memory of repeating KV heads to query heads would hold
``n_heads / n_kv_heads`` identical copies; one copy gives the same output with less memory.

Use :func:`apply_infini` on a built llama3 model (before ``parallelize``), log
:func:`gate_values`, and give the gates their own optimizer group with :func:`with_gate_param_group`.
In training, :class:`InfiniOptions` (``--infini.*``) does all three through
:class:`titanenv.train.trainer.TitanenvTrainer` (recipes ``titanenv_debug_infini``, ``titanenv_1b_infini``).
Tensor parallelism and context parallelism are not supported yet (the segment loop needs the
whole sequence and all heads of a KV group on one rank); FSDP is.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import spmd_types as spmd  # type: ignore[import-untyped]  # no type hints
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.models.common.attention import AttentionMasksType, GQAttention
from torchtitan.models.common.decoder_sharding import dense_param_placement
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.sharding import ShardingConfig

__all__ = [
    "GATE_PATTERN",
    "InfiniAttention",
    "InfiniConfig",
    "InfiniConverter",
    "InfiniOptions",
    "apply_infini",
    "document_ids",
    "gate_metrics",
    "gate_param_group",
    "gate_values",
    "infini_model_config",
    "memory_attention",
    "retrieve_memory",
    "segment_attention",
    "segment_mask",
    "segment_mask_mod",
    "sigma",
    "update_memory",
    "with_gate_param_group",
]

Update = Literal["linear", "delta"]
Documents = Literal["reset", "carry"]

GATE_PATTERN = r"(?:^|\.)attention\.gate$"
"""Regex (``re.search``) for the gate parameters' FQNs, also behind activation-checkpoint or
compile wrappers (``layers.3._checkpoint_wrapped_module.attention.gate``). TorchTitan's
``OptimizersContainer.Config.param_groups`` takes the first matching group, so the gate group
goes before the catch-all ``.*``."""


@dataclass(frozen=True)
class InfiniConfig:
    """Settings of the Infini-attention layers (arXiv:2404.07143)."""

    segment_len: int
    """Tokens per segment ``N``. Local attention sees only its segment; earlier segments are
    reached only through the memory. The sequence length need not be a multiple of it."""

    update: Update = "linear"
    """Memory update rule: "linear" (paper eq. 4) or "delta" (eq. 5, stores only what the memory
    does not already retrieve)."""

    gate_init: float = 0.0
    """Initial β of every head; sigmoid(0) = 0.5 mixes memory and local attention equally."""

    gate_lr: float = 1e-2
    """Learning rate of the β parameters (their own optimizer group, see :func:`gate_param_group`)."""

    gate_weight_decay: float = 0.0
    """Weight decay of the β parameters; 0 so that decay does not pull every gate towards 0.5."""

    documents: Documents = "reset"
    """What the memory does at a packed-document boundary (a 0 in the model's ``positions``).
    "reset" (default): a token retrieves only from earlier segments of its own document and the
    memory restarts at each new document, matching the baseline's block-causal document mask, so
    no information crosses documents. "carry": boundaries are ignored, the memory runs over the
    whole packed row. Without ``positions`` (CPU runs) a row is one document and both agree.
    Local attention is document-masked whenever ``positions`` are given, in both modes."""

    def __post_init__(self) -> None:
        if self.segment_len < 1:
            raise ValueError(f"InfiniConfig.segment_len must be >= 1, got {self.segment_len}")
        if self.update not in ("linear", "delta"):
            raise ValueError(f"InfiniConfig.update must be 'linear' or 'delta', got {self.update!r}")
        if self.documents not in ("reset", "carry"):
            raise ValueError(f"InfiniConfig.documents must be 'reset' or 'carry', got {self.documents!r}")
        if not math.isfinite(self.gate_init):
            raise ValueError(f"InfiniConfig.gate_init must be finite, got {self.gate_init}")
        if self.gate_lr < 0 or self.gate_weight_decay < 0:
            raise ValueError("InfiniConfig.gate_lr and gate_weight_decay must be >= 0")


@dataclass(kw_only=True, slots=True)
class InfiniOptions:
    """Infini-attention in training (``--infini.*``); ``segment_len`` 0 is off (the baseline's attention).

    The fields are :class:`InfiniConfig`'s; :meth:`config` turns them into one.
    """

    segment_len: int = 0
    """Tokens per segment N (> 0: every attention layer becomes Infini-attention). 0: off. Not tied to
    --training.seq-len: a shorter sequence has fewer segments; it need not be a multiple of N."""

    update: Update = "linear"
    """Memory update rule: linear (paper eq. 4) or delta (eq. 5)."""

    gate_init: float = 0.0
    """Initial gate β of every head; sigmoid(0) = 0.5 mixes memory and local attention equally."""

    gate_lr: float = 1e-2
    """Learning rate of the gates (their own optimizer group, ahead of the recipe's groups)."""

    gate_weight_decay: float = 0.0
    """Weight decay of the gates; 0 keeps decay from pulling every gate towards 0.5."""

    documents: Documents = "reset"
    """At a packed-document boundary the memory restarts (reset) or runs on (carry)."""

    @property
    def enabled(self) -> bool:
        """Whether Infini-attention is on (``segment_len > 0``)."""
        return self.segment_len > 0

    def config(self) -> InfiniConfig:
        """The layers' settings.

        Raises:
            ValueError: naming the ``--infini.*`` flag, when Infini-attention is off or a value is out of range.
        """
        if self.segment_len < 1:
            raise ValueError(f"--infini.segment-len {self.segment_len}: Infini-attention is off; use > 0 to turn it on")
        if self.update not in ("linear", "delta"):
            raise ValueError(f"--infini.update {self.update!r}: choose linear or delta")
        if self.documents not in ("reset", "carry"):
            raise ValueError(f"--infini.documents {self.documents!r}: choose reset or carry")
        if not math.isfinite(self.gate_init):
            raise ValueError(f"--infini.gate-init {self.gate_init}: must be finite")
        for flag, value in (("gate-lr", self.gate_lr), ("gate-weight-decay", self.gate_weight_decay)):
            if not value >= 0:
                raise ValueError(f"--infini.{flag} {value}: must be >= 0")
        return InfiniConfig(
            segment_len=self.segment_len, update=self.update, gate_init=self.gate_init, gate_lr=self.gate_lr,
            gate_weight_decay=self.gate_weight_decay, documents=self.documents,
        )  # fmt: skip


def sigma(x: torch.Tensor) -> torch.Tensor:
    """``ELU(x) + 1``, the positive feature map of the memory (paper eq. 3); same shape and dtype."""
    return F.elu(x) + 1.0


def memory_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of ``M`` and ``z``: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def retrieve_memory(sigma_q: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``σ(Q) M / (σ(Q) z)`` (paper eq. 3), zeros where the memory is empty (``σ(Q) z == 0``).

    Args:
        sigma_q: ``σ(q)``, ``[B, n, H, G, D]`` (``G`` query heads share KV head ``h``).
        memory: ``M``, ``[B, H, D, Dv]``.
        norm: ``z``, ``[B, H, D]``.

    Returns:
        ``[B, n, H, G, Dv]`` in the common dtype. The zero branch keeps gradients finite.
    """
    num = torch.einsum("bnhgd,bhde->bnhge", sigma_q, memory)
    den = torch.einsum("bnhgd,bhd->bnhg", sigma_q, norm).unsqueeze(-1)
    full = den > 0
    return torch.where(full, num / torch.where(full, den, torch.ones_like(den)), torch.zeros_like(num))


def update_memory(
    memory: torch.Tensor,
    norm: torch.Tensor,
    sigma_k: torch.Tensor,
    v: torch.Tensor,
    update: Update,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment's memory update (paper eq. 4 "linear", eq. 5 "delta").

    linear: ``M + σ(K)ᵀ V``; delta: ``M + σ(K)ᵀ (V - σ(K) M / (σ(K) z))``; both ``z + Σ_t σ(K_t)``.

    Args:
        memory: ``M_{s-1}``, ``[B, H, D, Dv]``.
        norm: ``z_{s-1}``, ``[B, H, D]``.
        sigma_k: ``σ(k)`` of the segment, ``[B, n, H, D]``.
        v: values of the segment, ``[B, n, H, Dv]``.
        update: "linear" or "delta".
        token_mask: optional ``[B, n]`` 0/1 weights; tokens with 0 are left out of the update.

    Returns:
        ``(M_s, z_s)``, new tensors (the inputs are not modified).
    """
    if update == "delta":
        v = v - retrieve_memory(sigma_k.unsqueeze(3), memory, norm).squeeze(3)
    if token_mask is not None:
        sigma_k = sigma_k * token_mask[:, :, None, None]
    return memory + torch.einsum("bnhd,bnhe->bhde", sigma_k, v), norm + sigma_k.sum(dim=1)


def document_ids(positions: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """Per-token document index from TorchTitan's ``positions`` (a 0 starts a new document).

    Args:
        positions: ``int[B or 1, L]`` or ``None``.

    Returns:
        ``int64[B, L]``, non-decreasing along ``L`` (``-1`` before the first 0), or ``None``.
    """
    if positions is None:
        return None
    starts = (positions == 0).to(torch.int64).expand(batch, seq_len)
    return torch.cumsum(starts, dim=1) - 1


def segment_mask(segment_len: int, doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean SDPA mask for the segment-reshaped layout of :func:`segment_attention`.

    Args:
        segment_len: ``N``.
        doc_ids: ``int[B, S * N]`` (padded to whole segments) or ``None``.

    Returns:
        ``None`` for plain causal attention inside each segment (SDPA ``is_causal``), else
        ``bool[B * S, 1, N, N]``: causal and same document. Every query sees itself, so no row is empty.
    """
    if doc_ids is None:
        return None
    ids = doc_ids.reshape(-1, segment_len)
    causal = torch.ones(segment_len, segment_len, dtype=torch.bool, device=ids.device).tril()
    return (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]


def segment_mask_mod(
    segment_len: int, doc_ids: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlexAttention ``mask_mod`` over the full sequence: same segment, causal (and same document).

    Args:
        segment_len: ``N``.
        doc_ids: optional ``int[B, L]`` from :func:`document_ids`.
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        keep = (q_idx // segment_len == kv_idx // segment_len) & (kv_idx <= q_idx)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return keep

    return mask_mod


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``A_dot``: causal softmax attention inside each segment (block-diagonal causal), by SDPA.

    Args:
        q: ``[B, L, Hq, D]`` (RoPE applied).
        k: ``[B, L, Hkv, D]`` (RoPE applied), ``Hq`` a multiple of ``Hkv``.
        v: ``[B, L, Hkv, Dv]``.
        segment_len: ``N``; ``L`` need not be a multiple (the last segment is shorter).
        doc_ids: optional ``int[B, L]``; then attention also stays inside a document.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, L, Hq, Dv]``, dtype of ``q``.
    """
    batch, seq_len = q.shape[:2]
    n_seg = -(-seq_len // segment_len)
    pad = n_seg * segment_len - seq_len

    def to_segments(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0, 0, 0, 0, pad))
        t = t.view(batch, n_seg, segment_len, t.shape[2], t.shape[3]).transpose(2, 3)
        return t.reshape(batch * n_seg, t.shape[2], segment_len, t.shape[4])

    if doc_ids is not None:
        doc_ids = F.pad(doc_ids, (0, pad), value=-2)  # padded keys come after every real query
    mask = segment_mask(segment_len, doc_ids)
    out = F.scaled_dot_product_attention(
        to_segments(q),
        to_segments(k),
        to_segments(v),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    out = out.view(batch, n_seg, q.shape[2], segment_len, v.shape[3]).transpose(2, 3)
    return out.reshape(batch, n_seg * segment_len, q.shape[2], v.shape[3])[:, :seq_len]


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    update: Update = "linear",
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A_mem`` for every segment: retrieve with ``M_{s-1}``, then update with segment ``s``.

    Args:
        q: PRE-RoPE queries ``[B, L, Hq, D]``.
        k: PRE-RoPE keys ``[B, L, Hkv, D]``, ``Hq`` a multiple of ``Hkv``.
        v: values ``[B, L, Hkv, Dv]``.
        segment_len: ``N``.
        update: "linear" or "delta".
        doc_ids: optional ``int[B, L]`` (non-decreasing); then the memory resets per document
            (``documents="reset"``), else it runs over the whole row.

    Returns:
        ``[B, L, Hq, Dv]`` in :func:`memory_dtype`; zeros in the first segment (and, with
        ``doc_ids``, for tokens whose document starts in their segment).
    """
    dtype = memory_dtype(q.dtype)
    batch, seq_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    sq = sigma(q.to(dtype)).view(batch, seq_len, n_kv, n_heads // n_kv, head_dim)
    sk, vv = sigma(k.to(dtype)), v.to(dtype)
    memory = sq.new_zeros(batch, n_kv, head_dim, v.shape[3])
    norm = sq.new_zeros(batch, n_kv, head_dim)
    outs = []
    for start in range(0, seq_len, segment_len):
        end = min(start + segment_len, seq_len)
        out = retrieve_memory(sq[:, start:end], memory, norm)
        if doc_ids is not None and start > 0:  # only the document open at the segment start has memory
            same = (doc_ids[:, start:end] == doc_ids[:, start - 1 : start]).to(dtype)
            out = out * same[:, :, None, None, None]
        outs.append(out)
        if end == seq_len:
            break
        token_mask = None
        if doc_ids is not None:  # keep only the document that is still open at the segment end
            token_mask = (doc_ids[:, start:end] == doc_ids[:, end - 1 : end]).to(dtype)
            if start > 0:
                keep = (doc_ids[:, end - 1] == doc_ids[:, start - 1]).to(dtype)
                memory, norm = memory * keep[:, None, None, None], norm * keep[:, None, None]
        memory, norm = update_memory(memory, norm, sk[:, start:end], vv[:, start:end], update, token_mask)
    return torch.cat(outs, dim=1).reshape(batch, seq_len, n_heads, v.shape[3])


class InfiniAttention(GQAttention):  # type: ignore[misc]  # torchtitan ships no type hints
    """Drop-in for TorchTitan's ``GQAttention`` with Infini-attention (arXiv:2404.07143).

    Same submodules and parameter names as ``GQAttention`` (``qkv_linear.wqkv`` or
    ``qkv_linear.wq/wk/wv``, ``wo``, ``rope``, optional ``q_norm``/``k_norm``), so a baseline
    checkpoint loads with only ``gate`` missing. Extra parameter ``gate``: ``β``, ``[n_heads]``,
    initialised to ``gate_init``. ``attention_masks`` (the baseline's flex/varlen masks) is
    ignored: the segment mask is built here, from ``positions`` when given.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(GQAttention.Config):  # type: ignore[misc]  # torchtitan ships no type hints
        infini: InfiniConfig
        """Segment length, update rule, gate and document settings."""

    _sharding_config: ShardingConfig | None

    def __init__(self, config: InfiniAttention.Config) -> None:
        super().__init__(config)
        self._setup_infini(config.infini)

    def _setup_infini(self, cfg: InfiniConfig) -> None:
        self.infini = cfg
        ref = self.wo.weight
        self.gate = nn.Parameter(torch.full((self.n_heads,), cfg.gate_init, dtype=ref.dtype, device=ref.device))

    @classmethod
    def from_attention(cls, attention: GQAttention, cfg: InfiniConfig) -> InfiniAttention:
        """Wrap a built ``GQAttention``: reuse its submodules (and weights), add the gate.

        Raises:
            ValueError: if ``attention`` is already parallelized.
        """
        if attention._parallelized:
            raise ValueError("apply_infini must run before the model is parallelized")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("n_heads", "n_kv_heads", "head_dim", "enable_gqa", "scaling", "_param_init", "_sharding_config"):
            setattr(new, name, getattr(attention, name))
        for name in ("rope", "qkv_linear", "wo", "inner_attention", "q_norm", "k_norm"):
            setattr(new, name, getattr(attention, name))
        new._setup_infini(cfg)
        return new

    def _init_self_parameters(self) -> None:
        with torch.no_grad():
            self.gate.fill_(self.infini.gate_init)

    def parallelize(self, parallel_dims: object) -> None:
        """Declare the gate's placement (replicated over DP/CP, head-sharded over TP), then parallelize."""
        sc = self._sharding_config
        if sc is not None and "gate" not in sc.state_shardings:
            shardings = {**sc.state_shardings, "gate": dense_param_placement(tp=spmd.S(0))}
            self._sharding_config = dataclasses.replace(sc, state_shardings=shardings)
        super().parallelize(parallel_dims)

    def forward(
        self,
        x_BLD: torch.Tensor,
        attention_masks: AttentionMasksType | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, L, dim]`` -> ``[B, L, dim]``, dtype of ``x_BLD``; ``positions``: optional ``int[B or 1, L]``."""
        xq, xk, xv = self.qkv_linear(x_BLD)
        if self.q_norm is not None and self.k_norm is not None:
            xq, xk = self.q_norm(xq), self.k_norm(xk)
        doc_ids = document_ids(positions, xq.shape[0], xq.shape[1])
        cfg = self.infini
        mem = memory_attention(
            xq, xk, xv, cfg.segment_len, cfg.update, doc_ids if cfg.documents == "reset" else None
        )  # pre-RoPE q/k
        rq, rk = self.rope(xq, xk, positions)
        local = segment_attention(rq, rk, xv, cfg.segment_len, doc_ids, self.scaling)
        g = torch.sigmoid(self.gate.to(mem.dtype))[:, None]
        out = (g * mem + (1.0 - g) * local.to(mem.dtype)).to(xv.dtype)
        result: torch.Tensor = self.wo(out.flatten(2))
        return result


def apply_infini(model: nn.Module, cfg: InfiniConfig) -> list[str]:
    """Replace every ``GQAttention`` in a built (not yet parallelized) model by :class:`InfiniAttention`, in place.

    Works on meta-device models too; ``model.init_weights()`` then sets the gates to ``gate_init``.

    Returns:
        FQNs of the replaced modules, e.g. ``["layers.0.attention", ...]``.

    Raises:
        ValueError: if the model has no ``GQAttention`` or is already parallelized.
    """
    targets = [
        (fqn, parent, attr)
        for fqn, parent in model.named_modules()
        for attr, child in parent.named_children()
        if isinstance(child, GQAttention) and not isinstance(child, InfiniAttention)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no GQAttention module to replace")
    for _, parent, attr in targets:
        setattr(parent, attr, InfiniAttention.from_attention(getattr(parent, attr), cfg))
    return [f"{fqn}.{attr}" if fqn else attr for fqn, _, attr in targets]


def infini_model_config(model_config: object, cfg: InfiniConfig) -> list[str]:
    """Replace every ``GQAttention.Config`` in a TorchTitan model config tree by ``InfiniAttention.Config``, in place.

    The config-side twin of :func:`apply_infini`, for trainers that build the model themselves
    (meta device, then ``init_weights``); see also :class:`InfiniConverter`.

    Returns:
        FQNs of the replaced attention configs, e.g. ``["layers.0.attention", ...]``.

    Raises:
        ValueError: if the tree has no ``GQAttention.Config``.
    """
    found = [
        (fqn, c, parent, attr)
        for fqn, c, parent, attr in model_config.traverse(GQAttention.Config)  # type: ignore[attr-defined]
        if not isinstance(c, InfiniAttention.Config)
    ]
    if not found or any(parent is None for _, _, parent, _ in found):
        raise ValueError(f"{type(model_config).__name__} holds no GQAttention.Config to replace")
    for _, c, parent, attr in found:
        new = InfiniAttention.Config(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}, infini=cfg)
        if isinstance(parent, list):
            parent[attr] = new
        else:
            setattr(parent, attr, new)
    return [fqn for fqn, _, _, _ in found]


class InfiniConverter(ModelConfigConverter):  # type: ignore[misc]  # torchtitan ships no type hints
    """Model-config converter applying :func:`infini_model_config`.

    Use as ``model_registry("8B", converters=[InfiniConverter.Config(infini=InfiniConfig(2048))])``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):  # type: ignore[misc]  # torchtitan ships no type hints
        infini: InfiniConfig
        """Segment length, update rule, gate and document settings."""

    def __init__(self, config: InfiniConverter.Config) -> None:
        self.infini = config.infini

    def convert(self, model_config: object) -> object:
        """Replace the attention configs in place and return ``model_config``."""
        infini_model_config(model_config, self.infini)
        return model_config


def gate_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """``sigmoid(β)`` per head for each InfiniAttention layer (share of the memory term, 0..1).

    A sharded gate (FSDP's DTensor) is gathered with ``full_tensor()``, a collective: then call
    this on every rank of the mesh.

    Returns:
        ``{module FQN: float32[n_heads]}``, detached, on the parameters' device.
    """
    out = {}
    for fqn, m in model.named_modules():
        if isinstance(m, InfiniAttention):
            gate = m.gate.detach()
            out[fqn] = torch.sigmoid((gate.full_tensor() if isinstance(gate, DTensor) else gate).float())
    return out


_WRAPPERS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def gate_metrics(gates: dict[str, torch.Tensor]) -> dict[str, float]:
    """TensorBoard scalars of :func:`gate_values`: ``infini/gate/LAYER/head{h}``, ``infini/gate_mean/LAYER``.

    ``LAYER`` (``layers.{i}``) is the attention module's FQN without wrapper segments (activation
    checkpointing, compile) and without the trailing ``attention``.
    """
    out: dict[str, float] = {}
    for fqn, values in gates.items():
        parts = [p for p in fqn.split(".") if p not in _WRAPPERS]
        layer = ".".join(parts[:-1] if parts and parts[-1] == "attention" else parts)
        for head, value in enumerate(values.tolist()):
            out[f"infini/gate/{layer}/head{head}"] = value
        out[f"infini/gate_mean/{layer}"] = float(values.mean())
    return out


def gate_param_group(cfg: InfiniConfig, base: ParamGroupConfig) -> ParamGroupConfig:
    """Optimizer group for the gates: ``base``'s optimizer and kwargs, with ``gate_lr`` and ``gate_weight_decay``."""
    kwargs = {**copy.deepcopy(base.optimizer_kwargs), "lr": cfg.gate_lr, "weight_decay": cfg.gate_weight_decay}
    return ParamGroupConfig(pattern=GATE_PATTERN, optimizer_name=base.optimizer_name, optimizer_kwargs=kwargs)


def with_gate_param_group(optimizer: OptimizersContainer.Config, cfg: InfiniConfig) -> OptimizersContainer.Config:
    """Copy of a TorchTitan optimizer config with the gate group first (first match wins).

    The gate group copies the group that would otherwise have claimed the gates.

    Raises:
        ValueError: if no existing group matches a gate FQN (nothing to copy the optimizer from).
    """
    groups = [g for g in optimizer.param_groups if g.pattern != GATE_PATTERN]
    sample = "layers.0.attention.gate"
    base = next((g for g in groups if re.search(g.pattern, sample)), None)
    if base is None:
        raise ValueError(f"no optimizer param_groups pattern matches {sample!r}; add a catch-all '.*' group")
    return dataclasses.replace(optimizer, param_groups=[gate_param_group(cfg, base), *groups])
