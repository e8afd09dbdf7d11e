#!/usr/bin/env bash
# container_run.sh [COMMAND [ARG...]]
# Runs COMMAND in titanenv's environment: inside the configured Apptainer/Singularity image, or
# in the host venv with TITANENV_CONTAINER_RUNTIME=none. The venv is active and the offline
# environment (src/titanenv/offline.env) is set; TITANENV_OFFLINE=0 keeps the network, for
# fetching on a login node. With no COMMAND it opens an interactive shell.
# Arguments pass through byte for byte: they are never re-quoted through `bash -c`.
# TITANENV_BIND (comma-separated paths) adds binds, e.g. a wheelhouse outside the scratch folder.
# Runtime detection, binds and --nv are here, in bash, because this script must work before any
# Python environment exists; the Python face is `titanenv container shell|exec`.
set -euo pipefail

if [[ "${_TITANENV_INSIDE:-}" != 1 ]]; then
    # TITANENV_ROOT is the repository (this script's folder), also when TITANENV_CONFIG names a file elsewhere.
    TITANENV_ROOT="${TITANENV_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
    # Names the user's environment set, before the file's values are exported: `config show` origins.
    export TITANENV_FROM_ENVIRONMENT="${TITANENV_FROM_ENVIRONMENT-$(compgen -e | tr '\n' ' ')}"
    set -a
    # shellcheck source=configuration.sh
    source "${TITANENV_CONFIG:-$TITANENV_ROOT/configuration.sh}"
    if [[ "${TITANENV_OFFLINE:-1}" == 1 ]]; then
        source "$TITANENV_ROOT/src/titanenv/offline.env"
    fi
    set +a
    runtime=$TITANENV_CONTAINER_RUNTIME
    case $runtime in
        auto | apptainer | singularity | none) ;;
        *)
            echo "container_run.sh: TITANENV_CONTAINER_RUNTIME=$runtime is invalid; use one of auto, apptainer, singularity, none (configuration.sh or the environment)" >&2
            exit 2 ;;
    esac
    if [[ $runtime == auto ]]; then
        runtime=none
        for r in apptainer singularity; do
            if command -v "$r" >/dev/null; then runtime=$r; break; fi
        done
    fi
    if [[ $runtime != none ]]; then
        if [[ ! -f $TITANENV_IMAGE ]]; then
            echo "container_run.sh: no image at TITANENV_IMAGE=$TITANENV_IMAGE; build it with container/build_container.sh" >&2
            exit 1
        fi
        # --cleanenv keeps the host's environment out; <RUNTIME>ENV_* variables pass what the job needs.
        prefix=${runtime^^}ENV_
        for v in $(compgen -e); do
            case $v in
                TITANENV_* | HF_* | NLTK_DATA | PIP_CACHE_DIR | TRITON_CACHE_DIR | TORCHINDUCTOR_CACHE_DIR | TRANSFORMERS_OFFLINE | \
                DO_NOT_TRACK | WANDB_MODE | SLURM_* | SRUN_* | NCCL_* | UCX_* | GLOO_* | MASTER_* | CUDA_VISIBLE_DEVICES | TERM | \
                no_proxy | NO_PROXY)
                    export "$prefix$v=${!v}" ;;
                # Online (set-up on a login node): the site's proxy and package-index settings too.
                http_proxy | https_proxy | HTTP_PROXY | HTTPS_PROXY | all_proxy | ALL_PROXY | \
                PIP_INDEX_URL | PIP_EXTRA_INDEX_URL | PIP_FIND_LINKS | PIP_CERT | UV_*)
                    if [[ "${TITANENV_OFFLINE:-1}" != 1 ]]; then export "$prefix$v=${!v}"; fi ;;
            esac
        done
        export "${prefix}_TITANENV_INSIDE=1"
        binds=$TITANENV_ROOT
        for d in "$TITANENV_PROJECT_DIR" "$TITANENV_SCRATCH_DIR" "$TITANENV_DATA_DIR" "$TITANENV_CHECKPOINT_DIR" "$HF_HOME"; do
            mkdir -p "$d" && binds+=",$d"
        done
        if [[ -n "${TITANENV_BIND:-}" ]]; then binds+=",$TITANENV_BIND"; fi
        gpu=()
        if [[ -e /dev/nvidia0 ]]; then gpu=(--nv); fi
        exec "$runtime" exec --cleanenv "${gpu[@]}" --bind "$binds" "$TITANENV_IMAGE" \
            bash "$TITANENV_ROOT/container_run.sh" "$@"
    fi
fi

# Inside the container (or on the host with runtime none).
if [[ "${TITANENV_NO_VENV:-}" != 1 ]]; then
    if [[ ! -x "$TITANENV_VENV/bin/python" ]]; then
        echo "container_run.sh: no venv at TITANENV_VENV=$TITANENV_VENV; create it with env/set_up.sh install" >&2
        exit 1
    fi
    if [[ "${1:-}" == titanenv && ! -x "$TITANENV_VENV/bin/titanenv" ]]; then
        echo "container_run.sh: the venv at TITANENV_VENV=$TITANENV_VENV has no titanenv; reinstall with env/set_up.sh install" >&2
        exit 1
    fi
    export VIRTUAL_ENV="$TITANENV_VENV" PATH="$TITANENV_VENV/bin:$PATH"
fi
export _TITANENV_INSIDE=1
if (($# == 0)); then
    exec bash -i
fi
exec "$@"
