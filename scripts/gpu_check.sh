#!/usr/bin/env bash
# The CUDA check of docs/performance.md, in one go: `ats bench` for DeiT-S (random init) and the bundled
# reference model at batch 1, 8 and 64, in float32 and under bfloat16 autocast:
#   eager     unpatched against multi-stage ATS rho 0.7, token merging r = 13, and ATS rho 1 with fuse + distinct;
#   compiled  torch.compile of the unpatched model and of ATS rho 0.7 (adaptive: graph breaks at each selection);
#   static    both in static mode, compiled whole (fullgraph) with mode="reduce-overhead" (CUDA graphs).
# About 5 minutes on one NVIDIA GPU, most of it compiling.
#
#   scripts/gpu_check.sh [OUT]                      # JSON rows under OUT (default gpu-check/), one file per run
#   DEVICE=cpu QUICK=1 scripts/gpu_check.sh OUT     # the same runs, small (the reference model in DeiT-S's
#                                                   # place, batch 2, bf16 autocast only, the compiled runs
#                                                   # traced by the eager backend), on the CPU
#
# Needs the package installed (`make setup`, or pip install -e .) with a CUDA build of PyTorch; nothing is
# downloaded (DeiT-S is randomly initialised, the reference model is bundled). ATS=... overrides the command.
set -euo pipefail

OUT=${1:-gpu-check}
DEVICE=${DEVICE:-cuda}
ATS=${ATS:-ats}
if [ "${QUICK:-0}" = 1 ]; then
    MODEL=reference
    RUN="--batch-size 2 --repeats 1 --warmup 1"
    COMPILE="--compile --compile-backend eager"
    AUTOCASTS="bf16"
else
    MODEL=deit_small_patch16_224
    RUN="--batch-size 1 --batch-size 8 --batch-size 64 --repeats 5 --warmup 3"
    COMPILE="--compile"
    AUTOCASTS="none bf16"
fi
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} > "$OUT/device.txt"

for AUTOCAST in $AUTOCASTS; do
    COMMON="--device $DEVICE $RUN --autocast $AUTOCAST --json"
    for NAME in deit reference; do
        if [ "$NAME" = deit ]; then TARGET=$MODEL; else TARGET=reference; fi
        echo "autocast $AUTOCAST: $TARGET" >&2
        $ATS bench --model "$TARGET" --multi-stage 0.7 --merge 13 $COMMON > "$OUT/$NAME-eager-$AUTOCAST.json"
        $ATS bench --model "$TARGET" --multi-stage 1.0 --fuse --distinct 0.95 $COMMON \
            > "$OUT/$NAME-fuse-distinct-$AUTOCAST.json"
        $ATS bench --model "$TARGET" --multi-stage 0.7 $COMPILE $COMMON > "$OUT/$NAME-compiled-$AUTOCAST.json"
        $ATS bench --model "$TARGET" --multi-stage 0.7 --static $COMPILE --compile-mode reduce-overhead $COMMON \
            > "$OUT/$NAME-static-$AUTOCAST.json"
    done
done
echo "wrote $OUT/*.json and $OUT/device.txt" >&2
