#!/usr/bin/env bash
# The prepared GPU check of the speed issue (AMLN's step against vanilla's, and where
# AMLN's extra time goes), for a session that is lent a device machine. That machine's
# image has torch, torchvision, safetensors, PyYAML and tqdm but not pydantic or polars,
# and it cannot download, so the missing wheels travel with the working tree.
#
#   tools/gpu_check.sh fetch     # here, once: the wheels into .whl/ (git-ignored, ~56 MB; with the
#                                # ~2 MB tree that is near the device tool's 64 MiB: carry nothing else)
#   device run: command "bash tools/gpu_check.sh run", carry [".whl"], timeout_s 420
#
# "run" writes matrix.txt, phases.txt, cudnn.txt and extras.txt under $OUT (what the device tool brings back)
# and prints them. It takes about 5-7 minutes of the 15 a session has; record the
# tables in docs/benchmarks.md with this command.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
fetch)
    exclude=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    # the versions this checkout runs with here, for the device's Python 3.12; typing_extensions
    # too, since pydantic needs a newer one than the image may hold
    wheels=()
    for package in pydantic pydantic_core annotated_types typing_inspection typing_extensions polars polars_runtime_32; do
        wheels+=("$package==$(python3 -c "import importlib.metadata as m; print(m.version('$package'))")")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${wheels[@]}"
    ls -la .whl
    ;;
run)
    out="${OUT:-/tmp/gpu_check}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    python3 tools/bench_step.py --matrix --steps 20 --only "dml,afd,amln (full,amln L_C,amln +" 2>&1 | tee "$out/matrix.txt"
    python3 tools/bench_step.py --phases --precision bf16 --steps 20 --only "amln (full,amln L_C,amln +,amln D and C" 2>&1 | tee "$out/phases.txt"
    # cuDNN's algorithm search: off in cohort (it can pick different algorithms in different
    # processes, so Ray and local runs, and resumed ones, would no longer agree bit for bit)
    for flag in "" --cudnn-benchmark; do
        echo "bench_step bf16 ${flag:-(cudnn.benchmark off)}"
        python3 tools/bench_step.py --precision bf16 --steps 20 --only "amln (full" $flag
    done 2>&1 | tee "$out/cudnn.txt"
    # L_F and L_D's peer side per block against their fused rewrites (on a GPU, where small
    # convs are launch-bound, fusing the three blocks' passes may pay; on our CPU fusing D saved ~0.5% of a step)
    python3 tools/bench_extras.py --steps 30 --no-compile 2>&1 | tee "$out/extras.txt"
    ;;
*)
    echo "usage: tools/gpu_check.sh fetch | run   (fetch here; run on the device machine)" >&2
    exit 2
    ;;
esac
