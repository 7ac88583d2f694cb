#!/bin/bash
# The latent reference benchmark: bash benchmarks/latent_bench.sh gptq|rtn
# Each bit setting runs on its own (one torch thread; two roundings side by side on a 2-core CPU), so a
# finished setting is never lost. Guidance 1.5: where FP scored best in benchmarks/latent_guidance.py.
set -e
cd "$(dirname "$0")/.."
for bits in w4a8 w3a8 w8a8; do
  name=benchmarks/results/latent_bench_$1_$bits
  OMP_NUM_THREADS=1 tacdiff bench --model latent-reference --bits $bits --steps 50 --samples 500 \
    --calib-samples 128 --batch-size 250 --guidance-scale 1.5 --weight-rounding "$1" \
    --json $name.json --markdown $name.md --plot $name.png --grid "${name}_grid.png"
done
