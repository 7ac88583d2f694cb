#!/bin/bash
# The latent reference benchmarks: bash benchmarks/latent_bench.sh gptq|rtn|adaround [MODEL] [GUIDANCE] [BITS...]
#   MODEL: latent-reference (default; results latent_bench_*) or dit-reference (results dit_bench_*).
#   GUIDANCE: where FP scored best in benchmarks/latent_guidance.py (1.5 for latent-reference).
# Each bit setting runs on its own (one torch thread; two roundings side by side on a 2-core CPU), so a
# finished setting is never lost. Optional: EXTRA="--smooth-alpha 0.8" (more bench options) and TAG=name
# (appended to the result files' names), e.g. for the DiT's activation-range and channel-balancing rows.
set -e
cd "$(dirname "$0")/.."
rounding=$1
model=${2:-latent-reference}
guidance=${3:-1.5}
shift $(( $# < 3 ? $# : 3 ))
prefix=${model%-reference}
for bits in "${@:-w4a8 w3a8 w8a8}"; do
  for b in $bits; do
    name=benchmarks/results/${prefix}_bench_${rounding}_$b${TAG:+_$TAG}
    OMP_NUM_THREADS=1 tacdiff bench --model "$model" --bits "$b" --steps 50 --samples 500 \
      --calib-samples 128 --batch-size 250 --guidance-scale "$guidance" --weight-rounding "$rounding" \
      --json $name.json --markdown $name.md --plot $name.png --grid "${name}_grid.png" $EXTRA
  done
done
