"""The Python steps of ``benchmarks/gpu_check.sh`` (issue 14); each writes ``OUT/<step>.json`` and prints a summary.

    python benchmarks/gpu_check.py api-scan --out OUT     # torch names used by the train stage, resolved here
    python benchmarks/gpu_check.py compat --out OUT --recipe titanenv_1b
    python benchmarks/gpu_check.py preflight --out OUT    # GPU check passes; planted CUDA_VISIBLE_DEVICES= fails
    python benchmarks/gpu_check.py attention --out OUT --recipe titanenv_1b --data PREFIX
    python benchmarks/gpu_check.py report OUT             # OUT/results.md from every OUT/*.json

``api-scan`` reads the source of torchtitan, spmd_types, torch_checkpointing, torchdata and titanenv
(no import of them), collects every ``torch`` name they use (``from torch.x import y``, ``import
torch.x``, attribute chains such as ``torch.distributed.fsdp.fully_shard``) and resolves each one in
the running torch. A name that does not resolve is printed with every place that uses it, marked
``import-time`` (module level: importing the module fails), ``call-time`` (inside a function) or
``guarded`` (inside ``try: ... except ImportError``, AttributeError or Exception), and
``train-stage`` when the file is imported, statically, from the train stage's entry modules.
Keyword arguments are not checked (torch 2.11/2.12's ``create_block_mask`` lacks TorchTitan's
``separate_full_blocks=``, which only running the ``attention`` step shows).

``compat`` imports torchtitan 0.3.0 and the train stage and builds the recipe's model on the meta
device; an ImportError/AttributeError is printed as the exact missing API and the place asking for it.

``attention`` runs one batch of real data (documents separated by EOD, per-document positions)
through one model twice with the same weights: TorchTitan's FlexAttention with its document mask,
and ``F.scaled_dot_product_attention`` with an explicit block-diagonal causal boolean mask (same
positions, so RoPE is identical). The losses must agree within the stated tolerance; a third pass
with plain causal SDPA (no document mask) shows the check can tell the masks apart.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("torchtitan", "spmd_types", "torch_checkpointing", "torchdata", "titanenv")
ENTRY_MODULES = (
    "torchtitan.train",
    "torchtitan.trainer",
    "titanenv.train.recipes",
    "titanenv.train.cli",
    "titanenv.train.runner",
    "titanenv.eval",
    "titanenv.train.preflight",
)


def _write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- api-scan


def _package_dir(name: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _module_name(pkg_dir: Path, pkg: str, file: Path) -> str:
    rel = file.relative_to(pkg_dir).with_suffix("")
    parts = [pkg, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class _Collector(ast.NodeVisitor):
    """torch references of one file, and the modules it imports at module level."""

    def __init__(self, module: str, is_pkg: bool) -> None:
        self.module, self.is_pkg = module, is_pkg
        self.aliases: dict[str, str] = {}
        self.refs: list[tuple[str, int, str]] = []  # dotted, line, when (import-time, call-time, guarded)
        self.imports: set[str] = set()  # modules imported at module level (any package)
        self.depth = 0  # function nesting
        self.guard = 0  # inside try/except ImportError (or AttributeError, Exception)

    def _when(self) -> str:
        return "guarded" if self.guard else "import-time" if self.depth == 0 else "call-time"

    def _abs(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.module.split(".")
        if not self.is_pkg:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit_FunctionDef(self, node):  # noqa: N802
        for d in node.decorator_list:
            self.visit(d)
        self.visit(node.args)
        if node.returns:
            self.visit(node.returns)
        self.depth += 1
        for stmt in node.body:
            self.visit(stmt)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_Try(self, node):  # noqa: N802
        caught = set()
        for h in node.handlers:
            for t in h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]:
                caught.add(getattr(t, "id", getattr(t, "attr", None)) if t is not None else "BaseException")
        guarded = bool(caught & {"ImportError", "ModuleNotFoundError", "AttributeError", "Exception", "BaseException"})
        self.guard += guarded
        for stmt in node.body:
            self.visit(stmt)
        self.guard -= guarded
        for part in (node.handlers, node.orelse, node.finalbody):
            for stmt in part:
                self.visit(stmt)

    visit_TryStar = visit_Try  # noqa: N815

    def visit_Lambda(self, node):  # noqa: N802
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_Import(self, node):  # noqa: N802
        for a in node.names:
            if self.depth == 0:
                self.imports.add(a.name)
            if a.name == "torch" or a.name.startswith("torch."):
                self.refs.append((a.name, node.lineno, self._when()))
                if a.asname:
                    self.aliases[a.asname] = a.name
                else:
                    self.aliases["torch"] = "torch"

    def visit_ImportFrom(self, node):  # noqa: N802
        mod = self._abs(node)
        if self.depth == 0:
            self.imports.add(mod)
            self.imports.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
        if not node.level and (mod == "torch" or mod.startswith("torch.")):
            for a in node.names:
                if a.name == "*":
                    continue
                dotted = f"{mod}.{a.name}"
                self.refs.append((dotted, node.lineno, self._when()))
                self.aliases[a.asname or a.name] = dotted

    def visit_Attribute(self, node):  # noqa: N802
        if not isinstance(node.ctx, ast.Load):  # `torch.x.y = ...` defines a name, it does not use one
            self.generic_visit(node)
            return
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in self.aliases:
            self.refs.append((".".join([self.aliases[cur.id], *reversed(chain)]), node.lineno, self._when()))
            return  # the inner Attribute nodes are prefixes of this chain
        self.generic_visit(node)


def _resolve(dotted: str) -> str | None:
    """None when ``dotted`` resolves in this torch (or cannot be checked further); else the first missing name."""
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    path = parts[0]
    for p in parts[1:]:
        nxt = f"{path}.{p}"
        if isinstance(obj, types.ModuleType):
            try:
                obj = getattr(obj, p)
            except AttributeError:
                try:
                    obj = importlib.import_module(nxt)
                except ModuleNotFoundError:
                    return nxt
                except Exception as e:  # noqa: BLE001 - a module that exists but fails to import here
                    return f"{nxt} (import raised {type(e).__name__}: {str(e).splitlines()[0][:120]})"
            except Exception:  # noqa: BLE001 - lazy attributes that raise: not decidable statically
                return None
        elif isinstance(obj, type):
            if not hasattr(obj, p):
                return nxt
            obj = getattr(obj, p)
        else:
            return None  # an instance, function or constant: its attributes are not API names
        path = nxt
    return None


def _collect_files() -> dict[str, tuple[Path, _Collector]]:
    """Every parsable module of the scanned packages, with its collected references."""
    files: dict[str, tuple[Path, _Collector]] = {}
    for pkg in SCANNED:
        d = _package_dir(pkg)
        if d is None:
            continue
        for f in sorted(d.rglob("*.py")):
            try:
                tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"), str(f))
            except SyntaxError:
                continue
            mod = _module_name(d, pkg, f)
            c = _Collector(mod, f.name == "__init__.py")
            c.visit(tree)
            files[mod] = (f, c)
    return files


def _train_reach(files: dict[str, tuple[Path, _Collector]]) -> set[str]:
    """Static import closure of the train stage's entry modules (module-level imports, parents' __init__ too)."""
    reach: set[str] = set()
    todo = list(ENTRY_MODULES)
    while todo:
        m = todo.pop()
        if m in reach or m not in files:
            continue
        reach.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += [i for i in files[m][1].imports if i in files]
    return reach


def _print_scan(result: dict, n_missing: int) -> None:
    print(
        f"api-scan under torch {result['torch']}: {result['names_checked']} torch names used by {result['files']} "
        f"files ({result['train_stage_modules']} imported by the train stage); {n_missing} do not resolve"
    )
    others = 0
    for m, uses in result["missing"].items():
        train = [u for u in uses if "train-stage" in u]
        if not train:
            others += 1
            continue
        print(f"  MISSING {m}: {len(uses)} use(s), {len(train)} in the train stage: {'; '.join(train[:4])}")
    if others:
        print(
            f"  ... and {others} more used only outside the train stage (experiments, tests, MoE/DeepEP): "
            "see api_scan.json"
        )
    if result["missing_import_time_in_train_stage"]:
        print("  => importing the train stage fails on: " + ", ".join(result["missing_import_time_in_train_stage"]))


def api_scan(out: Path | None, quiet: bool = False) -> dict:
    import torch

    files = _collect_files()
    reach = _train_reach(files)
    missing: dict[str, list[str]] = {}
    checked: set[str] = set()
    cache: dict[str, str | None] = {}
    for mod, (_f, c) in files.items():
        for dotted, line, when in c.refs:
            if dotted not in cache:
                cache[dotted] = _resolve(dotted)
            checked.add(dotted)
            miss = cache[dotted]
            if miss is None:
                continue
            tags = [when] + (["train-stage"] if mod in reach else [])
            missing.setdefault(miss, []).append(f"{mod.replace('.', '/')}.py:{line} ({', '.join(tags)})")
    blocking = sorted(m for m, uses in missing.items() if any("import-time, train-stage" in u for u in uses))
    result = {
        "torch": torch.__version__,
        "files": len(files),
        "train_stage_modules": len(reach),
        "names_checked": len(checked),
        "missing": {m: sorted(set(u)) for m, u in sorted(missing.items())},
        "missing_import_time_in_train_stage": blocking,
    }
    if out is not None:
        _write(out, "api_scan", result)
    if not quiet:
        _print_scan(result, len(missing))
    return result


# ----------------------------------------------------------------------------- compat


def describe(e: BaseException) -> str:
    """The missing API named by an ImportError/AttributeError, with the line asking for it."""
    where = ""
    tb = traceback.extract_tb(e.__traceback__)
    for fr in reversed(tb):
        if any(f"/{p}/" in fr.filename for p in SCANNED):
            where = f" (needed at {fr.filename.split('site-packages/')[-1]}:{fr.lineno}: {fr.line})"
            break
    if isinstance(e, ImportError):
        msg = str(e)
        if msg.startswith("cannot import name"):
            name = msg.split("'")[1]
            return f"{e.name}.{name}{where}" if e.name else f"{msg}{where}"
        if isinstance(e, ModuleNotFoundError):
            return f"module {e.name}{where}"
        return f"{msg}{where}"
    if isinstance(e, AttributeError):
        obj = getattr(e, "obj", None)
        owner = getattr(obj, "__name__", None) or type(obj).__name__ if obj is not None else "?"
        return f"{owner}.{getattr(e, 'name', None) or str(e)}{where}"
    return f"{type(e).__name__}: {e}{where}"


def _versions() -> dict:
    from importlib import metadata

    v = {"python": platform.python_version(), "executable": sys.executable}
    for d in ("torch", "triton", "torchtitan", "torchdata", "torch_checkpointing", "spmd_types", "tyro",
              "transformers", "tokenizers", "tensorboard", "numpy", "pydantic", "typer", "titanenv"):  # fmt: skip
        try:
            v[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            v[d] = None
    return v


def compat(out: Path, recipe: str, tokenizer: Path) -> int:
    import torch

    res: dict = {"versions": _versions(), "recipe": recipe, "cuda": torch.cuda.is_available()}
    if res["cuda"]:
        res["device"] = torch.cuda.get_device_name()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if k != "executable"))
    t0 = time.monotonic()
    stage = "import torchtitan.train / torchtitan.trainer"
    try:
        import torchtitan.train  # noqa: F401
        import torchtitan.trainer  # noqa: F401

        stage = "import titanenv.train (recipes, trainer, dataloader, checkpointer, runner)"
        import titanenv.train.runner  # noqa: F401
        from titanenv.train import recipes, vocab

        stage = f"build {recipe} on the meta device"
        cfg = recipes.load_recipe(recipe)
        vocab.set_vocab_size(cfg, vocab.padded_vocab_size(vocab.tokenizer_vocab_size(tokenizer)))
        with torch.device("meta"):
            model = cfg.model_spec.model.build()
        n = sum(p.numel() for p in model.parameters())
        attn = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        res.update(
            ok=True,
            params=n,
            attention_modules=attn,
            compile=cfg.compile.enable,
            activation_checkpoint=type(cfg.activation_checkpoint).__qualname__ if cfg.activation_checkpoint else None,
            mixed_precision_param=cfg.training.mixed_precision_param,
        )
        fsdp_dtype = cfg.training.mixed_precision_param
        print(f"OK: torchtitan and the train stage import under torch {torch.__version__}; {recipe} builds on meta: "
              f"{n / 1e9:.3f}B parameters, {', '.join(attn)}, compile={cfg.compile.enable}, "
              f"AC={res['activation_checkpoint']}, FSDP mixed-precision params {fsdp_dtype}")  # fmt: skip
    except (ImportError, AttributeError) as e:
        res.update(ok=False, stage=stage, missing_api=describe(e), error=f"{type(e).__name__}: {e}")
        print(f"FAILED at '{stage}' under torch {torch.__version__}")
        print(f"MISSING API: {res['missing_api']}")
    except Exception as e:  # noqa: BLE001
        res.update(ok=False, stage=stage, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        print(f"FAILED at '{stage}': {type(e).__name__}: {e}")
    res["seconds"] = round(time.monotonic() - t0, 1)
    _write(out, "compat", res)
    return 0 if res["ok"] else 1


# ----------------------------------------------------------------------------- preflight


def preflight(out: Path) -> int:
    import torch

    from titanenv.train.preflight import check_gpus

    res: dict = {}
    n = torch.cuda.device_count()
    if n > 0:
        f = check_gpus("this-node", n)
        res["pass"] = {"ok": f.ok, "line": f.line()}
        print(f"preflight gpu check, {n} GPU(s) expected: {'PASS' if f.ok else 'FAIL'}: {f.line()}")
    else:
        res["pass"] = {"skipped": "no CUDA device here: the passing case needs a GPU"}
        print("preflight gpu check (passing case): SKIPPED, no CUDA device here")
    # Planted failure: the same check in a fresh process that sees no GPU, expecting one.
    code = (
        "from titanenv.train.preflight import check_gpus; f = check_gpus('this-node', 1); "
        "print(f.line()); raise SystemExit(0 if f.ok else 1)"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = (p.stdout.strip().splitlines() or [p.stderr.strip()[-300:]])[-1]
    # A CPU-only torch build cannot see the planted cause; its own failure is the one to name then.
    cause = "CUDA_VISIBLE_DEVICES=" if torch.version.cuda else "no CUDA support"
    named = cause in line and p.returncode == 1
    res["planted"] = {"rc": p.returncode, "line": line, "names_the_cause": named, "expected_cause": cause,
                      "torch_cuda": torch.version.cuda}  # fmt: skip
    print(f"planted failure (CUDA_VISIBLE_DEVICES= empty, 1 GPU expected): rc {p.returncode}, "
          f"{'named' if named else 'NOT named'}: {line}")  # fmt: skip
    res["ok"] = named and res["pass"].get("ok", True)
    _write(out, "preflight", res)
    return 0 if res["ok"] else 1


# ----------------------------------------------------------------------------- attention


def _block_diagonal_causal(positions):
    """[B, 1, L, L] bool: query i sees key j iff j <= i and both lie in the same document (positions reset to 0)."""
    import torch

    doc = torch.cumsum((positions == 0).int(), dim=1)  # [B, L] document id per token
    L = positions.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal[None])[:, None]


def attention(out: Path, recipe: str, data: Path, tokenizer: Path, batch: int, seq_len: int | None) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.common.attention import FlexAttention

    from titanenv.data import manifest as manifestlib
    from titanenv.train import recipes, vocab
    from titanenv.train.dataloader import TokenWindowDataset, resolve_eod_id

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = {"titanenv_1b": "1B", "titanenv_debug": "debugmodel"}[recipe]
    from torchtitan.models.llama3 import model_registry

    spec = model_registry(name, attn_backend="flex")  # the recipe's model; on CPU the recipe itself swaps in SDPA
    cfg = recipes.load_recipe(recipe)
    cfg.model_spec = spec
    vsize = vocab.padded_vocab_size(vocab.tokenizer_vocab_size(tokenizer))
    vocab.set_vocab_size(cfg, vsize)
    seq_len = seq_len or cfg.training.seq_len
    eod = resolve_eod_id(tokenizer, "", manifestlib.read(str(data)))
    ds = TokenWindowDataset(data, seq_len, shuffle=False, eod_id=eod)
    # The first windows holding the most document starts: the mask matters there.
    cand = sorted(range(min(ds.windows_per_rank, 4096)), key=lambda i: -int((ds.window(i)[0]["positions"] == 0).sum()))
    samples = [ds.window(i) for i in sorted(cand[:batch])]
    tokens = torch.stack([s[0]["input"] for s in samples]).to(device)
    positions = torch.stack([s[0]["positions"] for s in samples]).to(device)
    labels = torch.stack([s[1] for s in samples]).to(device)
    docs = int((positions == 0).sum())
    torch.manual_seed(0)
    dtypes = [torch.bfloat16, torch.float32] if cuda else [torch.float32]
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "recipe": recipe, "batch": batch,
                 "seq_len": seq_len, "documents_in_batch": docs, "runs": []}  # fmt: skip
    with torch.device(device):
        model = spec.model.build()
    model.init_states(buffer_device=device) if hasattr(model, "init_states") else None
    model.eval()
    sdpa_mask = _block_diagonal_causal(positions)
    orig_forward = FlexAttention.forward
    orig_compiled = FlexAttention._compiled_flex_attn
    import torchtitan.models.common.attention as tt_attention

    orig_mask_builder = tt_attention._compiled_create_block_mask
    if not cuda:
        # CPU: no compiled flex kernel here; eager flex_attention is PyTorch's reference implementation,
        # and the block mask is built eagerly too (same function, not compiled).
        from torch.nn.attention.flex_attention import create_block_mask

        FlexAttention._compiled_flex_attn = flex_attention
        tt_attention._compiled_create_block_mask = create_block_mask

    def sdpa_forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kw):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=sdpa_mask, scale=scale, enable_gqa=enable_gqa)
        return o.transpose(1, 2)

    def plain_causal(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kw):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(
            1, 2
        )

    def loss_of(m):
        with torch.no_grad():
            masks = m.get_attention_masks(positions)
            logits = m(tokens, positions, attention_masks=masks).float()
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item(), logits

    ok = True
    try:
        for dt in dtypes:
            m = model.to(dt)
            t0 = time.monotonic()
            FlexAttention.forward = orig_forward
            flex, lf = loss_of(m)
            t_flex = time.monotonic() - t0
            FlexAttention.forward = sdpa_forward
            sdpa, ls = loss_of(m)
            FlexAttention.forward = plain_causal
            causal, lc = loss_of(m)
            FlexAttention.forward = orig_forward
            logit_sdpa, logit_causal = (lf - ls).abs().max().item(), (lf - lc).abs().max().item()
            del lf, ls, lc
            # bf16: 8-bit mantissa (eps 2^-8 = 0.0039) in activations through every layer; fp32: rounding only.
            tol = 2e-2 if dt == torch.bfloat16 else 1e-4
            diff = abs(flex - sdpa)
            run = {
                "dtype": str(dt).split(".")[-1],
                "flex_doc_mask": flex,
                "sdpa_block_diagonal": sdpa,
                "sdpa_plain_causal": causal,
                "abs_diff": diff,
                "tolerance": tol,
                "ok": diff <= tol,
                "max_abs_logit_diff_sdpa_block_diagonal": logit_sdpa,
                "max_abs_logit_diff_plain_causal": logit_causal,
                "mask_matters": abs(flex - causal) > diff and logit_causal > logit_sdpa,
                "flex_seconds_incl_compile": round(t_flex, 1),
            }
            ok &= run["ok"]
            res["runs"].append(run)
            _write(out, "attention", {**res, "ok": ok})  # kept if a later dtype runs out of time
            print(
                f"attention {run['dtype']}: flex+doc mask {flex:.6f}, SDPA+block-diagonal {sdpa:.6f}, "
                f"|diff| {diff:.2e} (tol {tol:g}) {'OK' if run['ok'] else 'FAIL'}; plain causal {causal:.6f} "
                f"(differs by {abs(flex - causal):.2e}: the mask "
                f"{'matters' if run['mask_matters'] else 'DOES NOT matter'}); "
                f"max |logit diff| vs flex: block-diagonal SDPA {logit_sdpa:.2e}, plain causal {logit_causal:.2e}; "
                f"{docs} document starts in {batch}x{seq_len} tokens"
            )
    finally:
        FlexAttention.forward = orig_forward
        FlexAttention._compiled_flex_attn = orig_compiled
        tt_attention._compiled_create_block_mask = orig_mask_builder
    res["ok"] = ok
    if not cuda:
        res["note"] = (
            "CPU: eager flex_attention (reference implementation), fp32 only; "
            "the GPU run uses the compiled kernel in bf16 and fp32"
        )
    _write(out, "attention", res)
    return 0 if ok else 1


# ----------------------------------------------------------------------------- report


def _report_compat_without_shim(c0: dict) -> list[str]:
    v = c0["versions"]
    return [
        f"**Compatibility without the shim** (torch {v.get('torch')}, torchtitan {v.get('torchtitan')}): "
        f"FAILED at {c0.get('stage')}: missing API **{c0.get('missing_api') or c0.get('error')}**; the later "
        "steps ran with benchmarks/gpu_check_stubs/gpu_check_torch_shim.py",
        "",
    ]


def _report_compat(c: dict, shimmed: bool) -> list[str]:
    v = c["versions"]
    if c.get("ok"):
        outcome = (
            f"OK, {c['recipe']} builds on meta: {c['params'] / 1e9:.3f}B parameters, "
            f"{', '.join(c['attention_modules'])}"
        )
    else:
        outcome = f"FAILED at {c.get('stage')}: missing API **{c.get('missing_api') or c.get('error')}**"
    return [
        f"**Compatibility** (torch {v.get('torch')}, torchtitan {v.get('torchtitan')}, python {v.get('python')}): "
        + outcome
        + (" (with the shim)" if shimmed else ""),
        "",
    ]


def _report_api_scan(a: dict) -> list[str]:
    blocking = a["missing_import_time_in_train_stage"]
    lines = [
        f"**torch API scan** (torch {a['torch']}): {a['names_checked']} names, {len(a['missing'])} missing"
        + (f"; import-time in the train stage: {', '.join(blocking)}" if blocking else "")
    ]
    others = 0
    for m, uses in a["missing"].items():
        train = [u for u in uses if "train-stage" in u]
        if train:
            lines.append(f"- `{m}`: {len(uses)} use(s), {len(train)} in the train stage: {'; '.join(train[:3])}")
        else:
            others += 1
    if others:
        lines.append(
            f"- and {others} more used only outside the train stage (experiments, tests, MoE/DeepEP; api_scan.json)"
        )
    lines.append("")
    return lines


def _report_attention(a: dict) -> list[str]:
    lines = [
        f"**FlexAttention document mask vs SDPA block-diagonal** ({a['device']}, {a['recipe']}, "
        f"{a['batch']}x{a['seq_len']} tokens, {a['documents_in_batch']} document starts)",
        "",
        "| dtype | loss: flex + doc mask | loss: SDPA + block-diagonal mask | abs diff | tolerance | ok "
        "| loss: plain causal (no doc mask) | max abs logit diff: block-diagonal / plain causal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in a["runs"]:
        lines.append(
            f"| {r['dtype']} | {r['flex_doc_mask']:.6f} | {r['sdpa_block_diagonal']:.6f} | {r['abs_diff']:.2e} | "
            f"{r['tolerance']:g} | {'yes' if r['ok'] else 'NO'} | {r['sdpa_plain_causal']:.6f} | "
            f"{r['max_abs_logit_diff_sdpa_block_diagonal']:.2e} / {r['max_abs_logit_diff_plain_causal']:.2e} |"
        )
    if a.get("note"):
        lines.append(f"\n{a['note']}")
    lines.append("")
    return lines


def _report_preflight(p: dict) -> list[str]:
    ps, planted = p["pass"], p["planted"]
    passing = f"{'PASS' if ps['ok'] else 'FAIL'} ({ps['line']})" if "ok" in ps else f"skipped ({ps['skipped']})"
    cause = "names the cause" if planted["names_the_cause"] else "DOES NOT name the cause"
    return [
        f"**Preflight GPU check**: passing case: {passing}; planted `CUDA_VISIBLE_DEVICES=`: rc {planted['rc']}, "
        f"{cause} ({planted['line']})",
        "",
    ]


def report(out: Path) -> int:
    def load(name):
        p = out / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    lines = [f"# gpu_check results ({out.name})", ""]
    env = (out / "environment.txt").read_text() if (out / "environment.txt").is_file() else ""
    if env:
        lines += ["```", env.strip(), "```", ""]
    steps = (out / "steps.tsv").read_text().strip().splitlines() if (out / "steps.tsv").is_file() else []
    if steps:
        lines += ["| step | result | seconds | log |", "| --- | --- | --- | --- |"]
        for s in steps:
            name, result, secs, log = (s.split("\t") + ["", "", "", ""])[:4]
            lines.append(f"| {name} | {result} | {secs} | {log} |")
        lines.append("")
    c0 = load("compat_without_shim")
    if c0:
        lines += _report_compat_without_shim(c0)
    c = load("compat")
    if c:
        lines += _report_compat(c, shimmed=bool(c0))
    a = load("api_scan")
    if a:
        lines += _report_api_scan(a)
    t = out / "throughput.md"
    if t.is_file():
        lines += ["**Throughput**", "", t.read_text().strip(), ""]
    a = load("attention")
    if a:
        lines += _report_attention(a)
    p = load("preflight")
    if p:
        lines += _report_preflight(p)
    e = out / "eval.txt"
    if e.is_file():
        lines += ["**Checkpoint -> `titanenv eval` on CPU**: " + e.read_text().strip(), ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("api-scan")
    s.add_argument("--out", type=Path)
    s = sub.add_parser("compat")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--recipe", default="titanenv_1b")
    s.add_argument("--tokenizer", type=Path, required=True, help="folder holding tokenizer.json")
    s = sub.add_parser("preflight")
    s.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("attention")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--recipe", default="titanenv_1b")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--tokenizer", type=Path, required=True, help="folder holding tokenizer.json")
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--seq-len", type=int)
    s = sub.add_parser("report")
    s.add_argument("out", type=Path)
    a = p.parse_args()
    if a.cmd == "api-scan":
        api_scan(a.out)
        return 0
    if a.cmd == "compat":
        return compat(a.out, a.recipe, a.tokenizer)
    if a.cmd == "preflight":
        return preflight(a.out)
    if a.cmd == "attention":
        return attention(a.out, a.recipe, a.data, a.tokenizer, a.batch, a.seq_len)
    return report(a.out)


if __name__ == "__main__":
    sys.exit(main())
