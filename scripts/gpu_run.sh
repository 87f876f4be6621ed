#!/usr/bin/env bash
# The prepared one-GPU run (issue 14), as one command for a time-limited lease of a GPU machine:
#   bash scripts/gpu_run.sh [OUT]          (TINY=1: the same steps on the CPU with tiny sizes, as a check)
# Each step has its own time limit, so that a slow torch.compile cannot take the other tables with it; the
# tables of every step that finished are packed into OUT/gpu_run.tgz (after each step), the log into OUT/gpu_run.log.
# Wheels in .whl/ (e.g. MONAI and SimpleITK, absent from a bare CUDA image) are installed into /tmp/site first.
set -u
out=${1:-out/gpu_run}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
steps=${STEPS:-main compile_logonet speed compile_swinunetr}  # STEPS="main speed": a subset, e.g. to finish a run
if [ "${TINY:-0}" = 1 ]; then
    gpu=(--tiny --device cpu --runs 1); speed=(--device cpu --size 64 --models logonet:T,swinunetr)
    big=logonet:T; limits=(120 120 120 60)
else
    gpu=(--device cuda --runs 2); speed=(--device cuda --models logonet:S,swinunetr)
    big=logonet:S; limits=(${MAIN_LIMIT:-200} 150 170 40)
fi
step() {  # step NAME LIMIT ARGS...: one logonet command under its own time limit, its tables in $work/NAME
    local name=$1 limit=$2; shift 2
    case " $steps " in *" $name "*) ;; *) echo "== $name: skipped (not in STEPS)"; return;; esac
    echo "== $name (limit ${limit}s): logonet $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$py" -m logonet "$@" --progress jsonl --out "$work/$name"
    echo "== $name: exit $? after $((SECONDS - start)) s"
    tar czf "$out/gpu_run.tgz" -C "$work" .  # after every step: a lease that ends mid-run keeps what finished
}
{
    date -u; uptime; nvidia-smi 2>/dev/null | head -15; "$py" -c 'import torch, monai; print("torch", torch.__version__, "monai", monai.__version__)'
    step main "${limits[0]}" bench gpu "${gpu[@]}" --variants "fp32,fp16,bf16,fp16 + channels_last_3d"
    step compile_logonet "${limits[1]}" bench gpu "${gpu[@]}" --parts cases --models "$big" --variants "fp16 + torch.compile"
    step speed "${limits[3]}" bench speed "${speed[@]}" --no-variants --no-compile --op-profile none --warmup 3 --runs 10
    step compile_swinunetr "${limits[2]}" bench gpu "${gpu[@]}" --parts cases --models swinunetr --variants "fp16 + torch.compile"
    uptime
} 2>&1 | tee "$out/gpu_run.log"
