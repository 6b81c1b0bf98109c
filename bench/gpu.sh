#!/usr/bin/env bash
# Every GPU measurement of the speed work in one prepared run (a lent accelerator's time is
# short): the guided step at 512 in fp32 / bf16 / fp16, eager and torch.compile'd; batch-16
# throughput; the whole 512x512 inpaint; peak GPU memory (each JSON's peak_gpu_gib).
#
#   bash bench/gpu.sh                          # on the GPU machine; JSON into bench/results/
#   DEVICE=cpu TINY=1 OUT=/tmp/b bash bench/gpu.sh   # a smoke test of this script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [[ -n "${TINY:-}" ]]; then
    runs=2; steps=(--steps 3); weights=(--weights ../shared/reference/parity); tiny=(--tiny)
    size=(--size 128)
else
    runs=20; steps=(); weights=(); tiny=(); size=()
fi
python -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
python bench/unet_step.py --device "$DEVICE" "${weights[@]}" --runs "$runs" --compile \
    --out "$OUT/unet_step_$DEVICE.json"
python bench/unet_step.py --device "$DEVICE" "${weights[@]}" --runs "$runs" --batch 16 \
    --out "$OUT/unet_step_${DEVICE}_batch16.json"
python bench/inpaint.py --device "$DEVICE" "${tiny[@]}" "${steps[@]}" --runs "$((runs / 2))" \
    --scenarios native --compile --out "$OUT/inpaint_$DEVICE.json"
python bench/tiny_decoder.py --device "$DEVICE" "${size[@]}" --runs "$runs" --out "$OUT/tiny_decoder_$DEVICE.json"
