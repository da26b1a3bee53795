#!/usr/bin/env bash
# The pycolmap pipeline end to end with the model on a CUDA GPU: the quick-start demo, the six held-out
# scenes at 518x392 (forward and orbit, 24 views) and forward 1000000 at 96 views, each against pycolmap SIFT
# on the same machine's CPU cores. Run from the repository root on a GPU machine:
#
#     bash benchmarks/pipeline_cuda.sh OUT
#
# Results: OUT/demo (the demo's project and demo.json) and OUT/pipeline_default_*_cuda.{md,json}.
set -euo pipefail
out=${1:?usage: bash benchmarks/pipeline_cuda.sh OUT}
cache=${CACHE:-/tmp/pipeline_bench_cache}
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$python" -m speed3r_sfm.cli demo --output "$out/demo" --device cuda
for trajectory in forward orbit; do
    "$python" benchmarks/pipeline_synthetic.py --methods default sift --seeds 1000000 1000001 1000002 \
        --trajectory "$trajectory" --device cuda --cache "$cache" --out "$out/pipeline_default_${trajectory}_cuda"
done
"$python" benchmarks/pipeline_synthetic.py --methods default sift --seeds 1000000 --views 96 \
    --trajectory forward --device cuda --cache "$cache" --out "$out/pipeline_default_forward_96v_cuda"
