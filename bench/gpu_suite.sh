#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py) on a lent GPU whose image has torch, transformers and peft but no network
# and no DeepSpeed. Two steps:
#   bench/gpu_suite.sh carry          here (network): wheels the image lacks -> .gpu_carry/ (gitignored), <= 64 MiB
#   bench/gpu_suite.sh run [ARGS...]  there: installs them to a private folder, runs the suite (ARGS go to it) in
#                                     under 10 minutes, results in $OUT (or runs/gpu_suite)
# With the device tool: run(command="bench/gpu_suite.sh run", carry=[".gpu_carry"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.gpu_carry
LIMIT_MIB=64
# DeepSpeed and what it imports that the image lacks (it has torch, numpy, packaging, psutil, py-cpuinfo, ninja,
# msgpack, einops, tqdm, typing-extensions). pydantic 2.11 needs only typing-extensions >= 4.12.2 (2.14 wants 4.16,
# which the image may predate), so nothing the image has is shadowed.
DEEPSPEED=deepspeed==0.19.8
WHEELS=(hjson==3.1.0 pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1)

carry() {
    local py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY" "${WHEELS[@]}"
    # PyPI has DeepSpeed only as an sdist. With no ops compiled (DS_BUILD_OPS=0, the default) it builds into a
    # pure-Python py3-none-any wheel; its setup.py imports torch, hence no build isolation (any torch will do).
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY" "$DEEPSPEED"
    if ! ls "$CARRY"/deepspeed-*-py3-none-any.whl >/dev/null; then
        echo "deepspeed did not build a py3-none-any wheel" >&2
        exit 1
    fi
    ls -l "$CARRY"
    local bytes
    bytes=$(du -sb "$CARRY" | cut -f1)
    echo "carry folder $CARRY: $(awk "BEGIN {printf \"%.2f\", $bytes / 1048576}") MiB (limit $LIMIT_MIB MiB)"
    if (( bytes > LIMIT_MIB * 1024 * 1024 )); then
        echo "over the $LIMIT_MIB MiB a device call can carry" >&2
        exit 1
    fi
}

run() {
    local site=${RECLLM_GPU_SITE:-/tmp/recllm_gpu_site} out=${OUT:-runs/gpu_suite}
    if ls "$CARRY"/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$CARRY"/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no wheels in $CARRY (run 'bench/gpu_suite.sh carry' here and carry it): the DeepSpeed case will say so"
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export TORCH_EXTENSIONS_DIR=/tmp/recllm_torch_extensions
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
    mkdir -p "$out"
    # The suite stops starting cases at its --budget (540 s); the timeout only guards a case that hangs. Rows are
    # written after every case, so what finished comes back either way.
    timeout -k 10 585 python3 bench/gpu_suite.py --device cuda --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
}

case "${1:-}" in
    carry) carry ;;
    run) shift; run "$@" ;;
    *) echo "usage: bench/gpu_suite.sh carry | run [gpu_suite.py args]" >&2; exit 2 ;;
esac
