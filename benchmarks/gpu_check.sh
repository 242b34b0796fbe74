#!/usr/bin/env bash
# GPU readiness in one command, on a machine with a CUDA GPU (under 8 minutes on an H100/H200-class card):
# the tests on CUDA, the README's 256x256 sampling in fp16 and bf16 against float32, sample_speed.py --arch 256
# (fp16/bf16, batch 8 and 32, with the fraction of the card's matmul rate) and the evaluator's feature
# extraction, written to OUTDIR/gpu_check.json. See benchmarks/gpu_check.py (--device cpu --quick: a dry run).
#
#     benchmarks/gpu_check.sh OUTDIR
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: benchmarks/gpu_check.sh OUTDIR [gpu_check.py options]" >&2
    exit 2
fi
exec python "$(dirname "$0")/gpu_check.py" "$@"
