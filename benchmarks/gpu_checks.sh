#!/usr/bin/env bash
# Every GPU measurement in one run, each part under its own time limit, results into OUT (default
# benchmarks/results/gpu). Needs the project importable (pip install -e . or PYTHONPATH=src) and the
# full-size configs (CONFIGS, default ../shared/configs).
#   [PARTS="cuda_speed dit_scale scale device_check"] bash benchmarks/gpu_checks.sh [OUT]
# Parts: kernels and whole models on CUDA (cuda_speed.py, issue 16), the quantization/device check on the
# bundled model with its int8 column (device_check.py), the DiT-XL/2-sized quantize + calibrate
# (dit_scale.py, issue 18), and processes sharing one GPU under torchrun (scale.py, issue 17).
set -u
OUT=${1:-benchmarks/results/gpu}
CONFIGS=${CONFIGS:-../shared/configs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")"
case $OUT in /*) ;; *) OUT=../$OUT ;; esac
case $CONFIGS in /*) ;; *) CONFIGS=../$CONFIGS ;; esac

PARTS=${PARTS:-cuda_speed dit_scale scale device_check}
part() {  # part NAME SECONDS COMMAND...: run (if NAME is in PARTS), log to OUT/NAME.log, report how it ended
    local name=$1 limit=$2
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s (limit $limit s)"
    tail -n 4 "$OUT/$name.log"
}

nvidia-smi -L
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
part cuda_speed "${SPEED_LIMIT:-150}" python3 cuda_speed.py --configs "$CONFIGS" --out "$OUT/speed_cuda"
part dit_scale "${DIT_LIMIT:-100}" python3 dit_scale.py --device cuda --samples 8 --steps 10 --batch-size 8 \
    --markdown "$OUT/dit_scale_cuda.md"
part scale "${SCALE_LIMIT:-170}" python3 scale.py --device cuda:0 --configs 1x4 2x4 --samples 256 \
    --calib-samples 128 --steps 20 --batch-size 32 --out "$OUT/scale_cuda"
part device_check "${CHECK_LIMIT:-60}" python3 device_check.py --device cuda --batch 256
