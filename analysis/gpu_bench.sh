#!/usr/bin/env bash
# One command for a machine with a GPU: the bench's target set, a ResNet-18-shaped and a transformer-shaped
# workload, each with the roofline, synchronized timing and CUDA peak memory, as JSON (and the printed tables)
# under OUTDIR. Every part has its own time limit; the whole stays under 10 minutes on one GPU.
#
#   bash analysis/gpu_bench.sh OUTDIR            (PYTHON=... to choose the interpreter; DEVICE=cuda:1 for another GPU)
set -uo pipefail
OUT=${1:?usage: bash analysis/gpu_bench.sh OUTDIR}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh: CUDA is not available to $PY; nothing measured" >&2
    exit 2
fi
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
status=0
run() {   # run NAME SECONDS ARGS...: one bench invocation, its table to NAME.txt, its JSON to NAME.json
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$PY" -m curvlab bench --device "$DEVICE" --clock wall --json "$OUT/$name.json" "$@" \
        2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then echo "gpu_bench.sh: $name failed or timed out (exit $rc)" >&2; status=1; fi
}
run targets 240 --suite targets --repeats 5
run resnet18 150 --model resnet18 --batch 128 --repeats 3
run transformer 150 --model transformer --hidden 256,256,256,256 --batch 32 --repeats 3
echo "wrote $OUT/{targets,resnet18,transformer}.json"
exit $status
