#!/usr/bin/env bash
# benchmarks/gpu_check.sh: issue 14's GPU proof in one run (< 8 minutes); table and logs in OUT.
#
#   benchmarks/gpu_check.sh --prepare           here (package index reachable): the wheelhouse .whl/gpu/
#                                               (torchtitan 0.3.0 and the pure-Python packages the GPU
#                                               image lacks, no torch/triton/CUDA) and the tokenized
#                                               sample text .whl/gpu/data/train.*; carry .whl/gpu
#   benchmarks/gpu_check.sh OUT                 on the GPU machine (OUT=$OUT): every step below
#   benchmarks/gpu_check.sh --cpu-check OUT     here: the same steps on the CPU with titanenv_debug and a
#                                               handful of steps; GPU-only checks are skipped, saying why
#   benchmarks/gpu_check.sh --imitate-image DIR here: a Python 3.12 venv holding what the GPU machine's
#                                               Python has (torch 2.11.0+cu130, triton 3.6, transformers
#                                               5.17, tensorboard, tokenizers; ~5 GB), for --cpu-check
#
# Steps, each under `timeout` and the overall budget, each logged to OUT/logs/NN-step.log and listed
# in OUT/steps.tsv; a failed step does not stop the others; OUT/results.md is written at the end.
#   venv        a venv with --system-site-packages over the machine's Python (its torch is used),
#               the wheelhouse installed with --no-index --no-deps, titanenv from this tree (src/ on
#               a .pth, `titanenv` and `torchrun` entry points), a `datasets` stub when the image has
#               none (benchmarks/gpu_check_stubs: TorchTitan imports it, titanenv never calls it)
#   compat      torchtitan 0.3.0 and the train stage import, and the recipe builds on the meta
#               device; otherwise the exact missing torch API. If that API is one the shim
#               (benchmarks/gpu_check_stubs/gpu_check_torch_shim.py) provides and GPU_CHECK_SHIM is
#               auto, compat is rerun with the shim and later steps run with it, labelled so
#   api-scan    every torch name torchtitan/spmd_types/torch_checkpointing/titanenv use, resolved
#               in this torch (the missing ones, and whether importing the train stage needs them)
#   preflight   the preflight GPU check passes, and names a planted CUDA_VISIBLE_DEVICES= failure
#   throughput  benchmarks/train_throughput.py: stock TorchTitan launch vs `titanenv train`, same
#               recipe and data, GPU_CHECK_STEPS steps each (first GPU_CHECK_WARMUP left out)
#   attention   FlexAttention with document masks vs SDPA with an explicit block-diagonal mask
#   checkpoint  `titanenv train --recipe titanenv_debug` writes a checkpoint on this device ...
#   eval        ... and `titanenv eval` loads it on the CPU (CUDA_VISIBLE_DEVICES=)
#
# Environment:
#   GPU_CHECK_PYTHON     the machine's Python (default: the first of python3, python3.12, python with torch)
#   GPU_CHECK_IMAGE_SITE a site-packages folder layered under the venv as if it were the system's
#                        (--cpu-check takes it from --imitate-image's venv at /tmp/gpu-check-image)
#   GPU_CHECK_VENV       the check venv, made afresh (default /tmp/gpu-check-venv)
#   GPU_CHECK_BUDGET     seconds for everything (default 460 on the GPU, 1500 on the CPU)
#   GPU_CHECK_STEPS, GPU_CHECK_WARMUP  steps per launch, and how many are left out (50/10 GPU, 8/3 CPU)
#   GPU_CHECK_RESERVE    seconds kept for the steps after throughput (default 150)
#   GPU_CHECK_SHIM       auto | 0 | 1 (default auto)
#   GPU_CHECK_SKIP       comma-separated steps to leave out, e.g. for a rerun: api-scan,preflight
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl/gpu"
STUBS="$ROOT/benchmarks/gpu_check_stubs"
IMITATION_DEFAULT=/tmp/gpu-check-image

# Wheelhouse: pinned as in env/requirements.lock. Pure Python, except the two marked binary (cp312,
# x86_64 and aarch64). Deliberately absent: torch, triton, nvidia-*, numpy, tokenizers, tensorboard,
# safetensors (the image has them) and datasets (pyarrow alone is 55 MB: a stub stands in).
PURE=(torchtitan torchdata torch-checkpointing spmd-types tyro docstring-parser typeguard typing-extensions
      pydantic annotated-types typing-inspection typer rich markdown-it-py mdurl pygments shellingham annotated-doc)
BINARY=(pydantic-core zstandard)

die() { echo "gpu_check: $*" >&2; exit 2; }

pinned() {  # NAME -> NAME==VERSION from env/requirements.lock
    local v
    v=$(grep -i -m1 -E "^$1==" "$ROOT/env/requirements.lock" | sed -E 's/^[^=]+==([^ ]+).*/\1/')
    [[ -n "$v" ]] || die "$1 is not in env/requirements.lock"
    echo "$1==$v"
}

prepare() {
    local py="${GPU_CHECK_HOST_PYTHON:-$ROOT/.venv/bin/python}" reqs=() n
    [[ -x "$py" ]] || die "--prepare needs the dev venv ($py): env/set_up.sh install --dev"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS/data"
    for n in "${PURE[@]}" "${BINARY[@]}"; do reqs+=("$(pinned "$n")"); done
    printf '%s\n' "${reqs[@]}" >"$WHEELS/requirements.txt"
    local common=(download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$WHEELS")
    "$py" -m pip "${common[@]}" --platform any "${reqs[@]:0:${#PURE[@]}}" || die "pip download (pure Python) failed"
    for plat in "manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64" \
                "manylinux_2_28_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64"; do
        local flags=()
        for p in $plat; do flags+=(--platform "$p"); done
        "$py" -m pip "${common[@]}" "${flags[@]}" "${reqs[@]:${#PURE[@]}}" || die "pip download ($plat) failed"
    done
    # The data both launches train on: sample_data's text, GPT-2 ids, EOD after each document.
    "$(dirname "$py")/titanenv" preprocess --input "$ROOT/sample_data/wikitext2_valid_test_docs.jsonl" \
        "$ROOT"/sample_data/c4-sample.0[123].json.gz --output-prefix "$WHEELS/data/train" \
        --tokenizer-model "$ROOT/sample_data/gpt2_tokenizer.json" --append-eod || die "preprocess failed"
    echo "wheelhouse $WHEELS: $(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) with the data"
    ls -l "$WHEELS" "$WHEELS/data" | awk 'NF > 5 {print $5, $9}'
}

imitate_image() {  # DIR: python3.12 venv with the GPU machine's own packages (from the package index)
    local dir="$1" py312="${GPU_CHECK_PYTHON312:-$(command -v python3.12)}"
    [[ -x "$py312" ]] || die "--imitate-image needs python3.12 (GPU_CHECK_PYTHON312)"
    "$py312" -m venv "$dir" || die "venv failed"
    "$dir/bin/pip" install torch==2.11.0 triton==3.6.0 "transformers==5.17.*" tensorboard tokenizers || die "pip failed"
    "$dir/bin/python" -c "import torch, triton, transformers; print('image:', torch.__version__, triton.__version__, transformers.__version__)"
}

# ----------------------------------------------------------------------------- the run

MODE=gpu
case "${1:-}" in
    --prepare) prepare; exit $? ;;
    --imitate-image) [[ $# -eq 2 ]] || die "usage: $0 --imitate-image DIR"; imitate_image "$2"; exit $? ;;
    --cpu-check) MODE=cpu; shift ;;
    -h|--help|"") sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
esac
[[ $# -eq 1 ]] || die "usage: $0 [--cpu-check] OUT"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)" || die "cannot create $1"
LOGS="$OUT/logs" && mkdir -p "$LOGS"
WORK="$OUT/work" && mkdir -p "$WORK"
: >"$OUT/steps.tsv"
START=$SECONDS
if [[ $MODE == cpu ]]; then
    BUDGET=${GPU_CHECK_BUDGET:-1500} STEPS=${GPU_CHECK_STEPS:-8} WARMUP=${GPU_CHECK_WARMUP:-3} RECIPE=titanenv_debug
    if [[ -z "${GPU_CHECK_IMAGE_SITE:-}" && -z "${GPU_CHECK_PYTHON:-}" && -d $IMITATION_DEFAULT ]]; then
        GPU_CHECK_PYTHON=$(readlink -f "$IMITATION_DEFAULT/bin/python")
        GPU_CHECK_IMAGE_SITE=$("$IMITATION_DEFAULT/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    fi
    export CUDA_VISIBLE_DEVICES=""  # no GPU use even where one exists: this is the CPU rehearsal
else
    BUDGET=${GPU_CHECK_BUDGET:-460} STEPS=${GPU_CHECK_STEPS:-50} WARMUP=${GPU_CHECK_WARMUP:-10} RECIPE=titanenv_1b
fi
BASE_PY="${GPU_CHECK_PYTHON:-}"
if [[ -z $BASE_PY ]]; then  # the machine's Python is the first one that has torch
    for c in python3 python3.12 python /usr/bin/python3; do
        command -v "$c" >/dev/null && "$c" -c 'import torch' 2>/dev/null && { BASE_PY=$(command -v "$c"); break; }
    done
    BASE_PY=${BASE_PY:-python3}
fi
VENV="${GPU_CHECK_VENV:-/tmp/gpu-check-venv}"
PY="$VENV/bin/python"
SHIM="${GPU_CHECK_SHIM:-auto}"
DATA="$WHEELS/data/train"
TOK="$WORK/tokenizer"  # a folder holding tokenizer.json, as TorchTitan's --hf-assets-path wants
mkdir -p "$TOK" && cp "$ROOT/sample_data/gpt2_tokenizer.json" "$TOK/tokenizer.json"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
N=0

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME TIMEOUT MIN CMD...: run CMD under `timeout` (at most what the budget leaves), log, record.
step() {
    local name="$1" want="$2" min="$3" t rc secs log status
    shift 3
    N=$((N + 1))
    if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
        skip "$name" "GPU_CHECK_SKIP"
        return 98
    fi
    log="$LOGS/$(printf %02d $N)-$name.log"
    t=$(( $(left) - 5 ))
    (( t > want )) && t=$want
    if (( t < min )); then
        printf '%s\tSKIPPED (budget: %ss left, needs %ss)\t0\t%s\n' "$name" "$(left)" "$min" "" >>"$OUT/steps.tsv"
        echo "== $name: SKIPPED, budget ($(left) s left)"
        return 99
    fi
    echo "== $name (timeout ${t}s, $(left)s of the budget left): $*" | tee "$log"
    local t0=$SECONDS
    if declare -F "$1" >/dev/null; then  # a function of this script: in a bash child (exported below)
        timeout -k 10 "$t" bash -c '"$@"' _ "$@" >>"$log" 2>&1
    else
        timeout -k 10 "$t" "$@" >>"$log" 2>&1
    fi
    rc=$?
    secs=$((SECONDS - t0))
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${t}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "logs/$(basename "$log")" >>"$OUT/steps.tsv"
    echo "   -> $status in ${secs}s; last lines:"
    tail -n 6 "$log" | sed 's/^/      /'
    return $rc
}

skip() {  # NAME REASON
    printf '%s\tSKIPPED (%s)\t0\t\n' "$1" "$2" >>"$OUT/steps.tsv"
    echo "== $1: SKIPPED ($2)"
}

environment() {
    date -u +"date: %Y-%m-%d %H:%M UTC"
    echo "mode: $MODE; recipe $RECIPE; $STEPS steps per launch, first $WARMUP left out; budget ${BUDGET}s"
    echo "host: $(uname -srm); $(nproc) cores; $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
    else
        echo "gpu: none (no nvidia-smi)"
    fi
    echo "python: $BASE_PY ($("$BASE_PY" -c 'import sys; print(sys.version.split()[0], sys.executable)'))${GPU_CHECK_IMAGE_SITE:+; image site $GPU_CHECK_IMAGE_SITE}"
    echo "wheelhouse: $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels, $(du -sh "$WHEELS" 2>/dev/null | cut -f1) with the data"
}

make_venv() {
    rm -rf "$VENV"
    "$BASE_PY" -m venv --system-site-packages --without-pip "$VENV" || return 1
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [[ -n "${GPU_CHECK_IMAGE_SITE:-}" ]]; then  # after the venv's own site-packages, like a system site
        echo "import site; site.addsitedir('$GPU_CHECK_IMAGE_SITE')" >"$site/zz_gpu_check_image.pth"
    fi
    # pip: the image's (as a module, seen through the system site), else the venv's ensurepip.
    "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --default-pip >/dev/null || return 1
    "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" -r "$WHEELS/requirements.txt" || return 1
    "$PY" -c 'import datasets' 2>/dev/null || { cp -r "$STUBS/datasets" "$site/" && echo "datasets: the stub (the image has none)"; }
    echo "$ROOT/src" >"$site/titanenv-src.pth"
    printf '#!%s\nimport sys\nfrom titanenv.cli import main\nsys.exit(main())\n' "$PY" >"$VENV/bin/titanenv"
    printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' "$PY" >"$VENV/bin/torchrun"
    chmod +x "$VENV/bin/titanenv" "$VENV/bin/torchrun"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|torchtitan|torchdata|torch.checkpointing|spmd.types|tyro|pydantic|typer|transformers|tokenizers|tensorboard|numpy) "
    "$PY" -m pip check || echo "(pip check: the lines above are informational; torch and triton are the image's)"
    "$VENV/bin/titanenv" --help >/dev/null && echo "titanenv entry point works"
}

enable_shim() {
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp "$STUBS/gpu_check_torch_shim.py" "$site/" &&
        echo "import os; os.environ.get('GPU_CHECK_NO_SHIM') or __import__('gpu_check_torch_shim').apply()" \
            >"$site/zz_gpu_check_torch_shim.pth" &&
        "$PY" -c 'import gpu_check_torch_shim as s; print("shim active, provides:", s.PROVIDED or "nothing (this torch has it all)")'
}

checkpoint_run() {
    "$VENV/bin/titanenv" train --recipe titanenv_debug --data "$DATA" --tokenizer "$TOK" --output-dir "$WORK/ckpt" \
        --steps 4 --checkpoint-interval 4 -- --debug.seed 0 --metrics.log-freq 1 &&
        ls -R "$WORK/ckpt/checkpoint" | head -20
}

eval_on_cpu() {
    CUDA_VISIBLE_DEVICES="" "$VENV/bin/titanenv" eval --output-dir "$WORK/ckpt" --data "$DATA" --max-windows 8 \
        --batch-size 4 | tee "$WORK/eval.out"
}

export -f make_venv enable_shim checkpoint_run eval_on_cpu
export ROOT WHEELS STUBS VENV PY BASE_PY DATA TOK WORK GPU_CHECK_IMAGE_SITE="${GPU_CHECK_IMAGE_SITE:-}"
echo "gpu_check ($MODE) -> $OUT"
environment | tee "$OUT/environment.txt"
cd "$ROOT" || exit 2
[[ -f "$WHEELS/requirements.txt" && -f "$DATA.bin" ]] || die "no wheelhouse at $WHEELS: run $0 --prepare first (and carry .whl/gpu)"
if [[ -z "${GPU_CHECK_IMAGE_SITE:-}" ]] && ! "$BASE_PY" -c 'import torch' 2>/dev/null; then
    die "$BASE_PY has no torch: set GPU_CHECK_PYTHON to the machine's Python with torch ($(command -v python3 python3.12 python 2>/dev/null | tr '\n' ' '))"
fi

step venv 180 30 make_venv || { skip rest "no venv"; "$BASE_PY" "$ROOT/benchmarks/gpu_check.py" report "$OUT"; exit 1; }
LABEL=""
if ! step compat 120 20 "$PY" benchmarks/gpu_check.py compat --out "$OUT" --recipe "$RECIPE" --tokenizer "$TOK"; then
    cp "$OUT/compat.json" "$OUT/compat_without_shim.json" 2>/dev/null
    # auto: the shim only when what is missing is a name it provides
    if [[ $SHIM == auto ]] && GPU_CHECK_STUBS="$STUBS" "$PY" - "$OUT/compat.json" <<'PY'
import json, os, sys
sys.path.insert(0, os.environ["GPU_CHECK_STUBS"])
import gpu_check_torch_shim as shim
missing = json.load(open(sys.argv[1])).get("missing_api") or ""
sys.exit(0 if any(missing.startswith(n) for n in shim.NAMES) else 1)
PY
    then
        SHIM=1
    fi
fi
if [[ $SHIM == 1 ]]; then
    step shim 30 5 enable_shim && LABEL=" (with benchmarks/gpu_check_stubs/gpu_check_torch_shim.py)"
    step compat-with-shim 120 20 "$PY" benchmarks/gpu_check.py compat --out "$OUT" --recipe "$RECIPE" --tokenizer "$TOK"
fi
[[ -n $LABEL ]] && echo "shim: later steps run$LABEL" >>"$OUT/environment.txt"
step api-scan 90 15 env GPU_CHECK_NO_SHIM=1 "$PY" benchmarks/gpu_check.py api-scan --out "$OUT"  # the bare torch
step preflight 60 10 "$PY" benchmarks/gpu_check.py preflight --out "$OUT"
# Two launches, each half of what is left after keeping ~150 s for attention, checkpoint and eval; the
# slowest part on the GPU is compilation (the model, the loss and the flex kernels, autotuned).
LAUNCH=$(( ($(left) - ${GPU_CHECK_RESERVE:-150}) / 2 ))
(( LAUNCH > 170 )) && [[ $MODE == gpu ]] && LAUNCH=170
(( LAUNCH > 400 )) && LAUNCH=400
step throughput $((2 * LAUNCH + 30)) 90 "$PY" benchmarks/train_throughput.py --recipe "$RECIPE" --data "$DATA" \
    --work "$WORK/throughput" --steps "$STEPS" --warmup "$WARMUP" --rounds 1 --nproc-per-node 1 \
    --timeout "$LAUNCH" --table "$OUT/throughput.md" --json "$OUT/throughput.json"
[[ -n $LABEL && -f "$OUT/throughput.md" ]] && echo "- measured$LABEL" >>"$OUT/throughput.md"
if [[ $MODE == gpu ]]; then
    step attention 100 30 "$PY" benchmarks/gpu_check.py attention --out "$OUT" --recipe "$RECIPE" --data "$DATA" \
        --tokenizer "$TOK" --batch 2
else  # the debug model: eager flex_attention (PyTorch's reference) against SDPA, fp32
    step attention 300 30 "$PY" benchmarks/gpu_check.py attention --out "$OUT" --recipe "$RECIPE" --data "$DATA" \
        --tokenizer "$TOK" --batch 2 --seq-len 512
fi
if step checkpoint "$([[ $MODE == gpu ]] && echo 90 || echo 240)" 30 checkpoint_run; then
    if step eval-on-cpu "$([[ $MODE == gpu ]] && echo 60 || echo 180)" 15 eval_on_cpu; then
        where=$([[ $MODE == gpu ]] && echo "written on the GPU" || echo "written on the CPU here (no GPU)")
        echo "checkpoint $where by \`titanenv train --recipe titanenv_debug\`, loaded by \`titanenv eval\` on the CPU: $(tail -n 1 "$WORK/eval.out")" >"$OUT/eval.txt"
    fi
else
    skip eval-on-cpu "no checkpoint"
fi
echo "total: $((SECONDS - START)) s of the ${BUDGET} s budget" | tee -a "$OUT/environment.txt"
"$PY" benchmarks/gpu_check.py report "$OUT" >/dev/null 2>"$LOGS/report.err" || "$BASE_PY" benchmarks/gpu_check.py report "$OUT"
echo
cat "$OUT/results.md"
