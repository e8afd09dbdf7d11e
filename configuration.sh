# titanenv site configuration: the one file you edit.
#
# Every value can be overridden from the environment, e.g.
#   TITANENV_MACHINE=local sbatch jsc/run_training_jwb.sbatch
# Plain data only: `titanenv config show` prints each resolved value and where it came from.
# A value left empty takes the machine profile's default (src/titanenv/config.py, MACHINES).

# The repository root; the scripts set it before sourcing this file. It is always the repository
# (the folder of container_run.sh), also when TITANENV_CONFIG names a copy of this file elsewhere.
TITANENV_ROOT="${TITANENV_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"

# Machine: jwb (JUWELS Booster), jwc (JUWELS Cluster), jrc (JURECA-DC), jpb (JUPITER),
# local (this machine, a laptop or CI), or auto (from JSC's $SYSTEMNAME, else local).
TITANENV_MACHINE="${TITANENV_MACHINE:-auto}"

# Slurm account (budget) and partitions. Empty partitions take the machine's defaults.
TITANENV_ACCOUNT="${TITANENV_ACCOUNT:-}"
TITANENV_CPU_PARTITION="${TITANENV_CPU_PARTITION:-}"
TITANENV_GPU_PARTITION="${TITANENV_GPU_PARTITION:-}"

# Project (shared, backed up) and scratch (large, fast) roots. JSC sets $PROJECT and $SCRATCH
# after `jutil env activate -p <project>`.
TITANENV_PROJECT_DIR="${TITANENV_PROJECT_DIR:-${PROJECT:-$TITANENV_ROOT}}"
TITANENV_SCRATCH_DIR="${TITANENV_SCRATCH_DIR:-${SCRATCH:-$TITANENV_ROOT/scratch}}"

# Where tokenized data and checkpoints go.
TITANENV_DATA_DIR="${TITANENV_DATA_DIR:-$TITANENV_SCRATCH_DIR/data}"
TITANENV_CHECKPOINT_DIR="${TITANENV_CHECKPOINT_DIR:-$TITANENV_SCRATCH_DIR/runs}"

# Caches. Compute nodes have no internet: HF_HOME must hold every model, tokenizer and dataset.
HF_HOME="${HF_HOME:-$TITANENV_SCRATCH_DIR/cache/huggingface}"
PIP_CACHE_DIR="${PIP_CACHE_DIR:-$TITANENV_SCRATCH_DIR/cache/pip}"
TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$TITANENV_SCRATCH_DIR/cache/triton}"
TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$TITANENV_SCRATCH_DIR/cache/inductor}"
# nltk data some lm-eval tasks need (e.g. punkt_tab for ifeval), fetched with the other assets.
NLTK_DATA="${NLTK_DATA:-$HF_HOME/nltk_data}"

# Container runtime: apptainer, singularity, none (host venv), or auto (apptainer, then
# singularity, then none). The image is built by container/build_container.sh.
TITANENV_CONTAINER_RUNTIME="${TITANENV_CONTAINER_RUNTIME:-auto}"
TITANENV_IMAGE="${TITANENV_IMAGE:-$TITANENV_PROJECT_DIR/container/titanenv.sif}"

# The Python venv laid inside the container (or on the host with runtime none) by env/set_up.sh.
TITANENV_VENV="${TITANENV_VENV:-$TITANENV_ROOT/.venv}"
