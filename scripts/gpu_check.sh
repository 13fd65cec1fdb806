#!/usr/bin/env bash
# The CUDA check of docs/performance.md, in one go: `ats bench` for DeiT-S (random init) and the bundled
# reference model, unpatched against multi-stage ATS (rho 1.0 and 0.7), ATS with fuse + distinct and token
# merging, at batch 1, 64 and 256, in float32 and under bfloat16 autocast. A few minutes on one NVIDIA GPU.
#
#   scripts/gpu_check.sh [OUT]                      # JSON rows under OUT (default gpu-check/), one file per run
#   DEVICE=cpu QUICK=1 scripts/gpu_check.sh OUT     # the same runs, small (DeiT-Ti, batch 1 and 2), on the CPU
#
# Needs the package installed (`make setup`, or pip install -e .) with a CUDA build of PyTorch; nothing is
# downloaded (DeiT-S is randomly initialised, the reference model is bundled). ATS=... overrides the command.
set -euo pipefail

OUT=${1:-gpu-check}
DEVICE=${DEVICE:-cuda}
ATS=${ATS:-ats}
if [ "${QUICK:-0}" = 1 ]; then
    MODEL=deit_tiny_patch16_224
    RUN="--batch-size 1 --batch-size 2 --repeats 1 --warmup 1"
else
    MODEL=deit_small_patch16_224
    RUN="--batch-size 1 --batch-size 64 --batch-size 256 --repeats 5 --warmup 3"
fi
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} > "$OUT/device.txt"

for AUTOCAST in none bf16; do
    COMMON="--device $DEVICE $RUN --autocast $AUTOCAST --json"
    echo "autocast $AUTOCAST: $MODEL" >&2
    $ATS bench --model "$MODEL" --multi-stage 1.0 --multi-stage 0.7 $COMMON > "$OUT/deit-rho-$AUTOCAST.json"
    $ATS bench --model "$MODEL" --multi-stage 1.0 --fuse --distinct 0.95 $COMMON > "$OUT/deit-fuse-distinct-$AUTOCAST.json"
    echo "autocast $AUTOCAST: reference" >&2
    $ATS bench --model reference --multi-stage 1.0 --multi-stage 0.7 --merge 15 $COMMON \
        > "$OUT/reference-rho-merge-$AUTOCAST.json"
    $ATS bench --model reference --multi-stage 1.0 --fuse --distinct 0.95 $COMMON \
        > "$OUT/reference-fuse-distinct-$AUTOCAST.json"
done
echo "wrote $OUT/*.json and $OUT/device.txt" >&2
