#!/usr/bin/env bash
# Synthesize a data-free calibration set on 8 GPUs with Accelerate (images are split over the GPUs and gathered).
#
#   MODEL=facebook/deit-small-patch16-224 SYNTHESIZER=sardfq NUM_IMAGES=256 bash examples/synthesize_multi_gpu.sh
#
# Any extra argument is passed on to examples/synthesize_multi_gpu.py (e.g. --cache-dir, --grid, --hyperparameters).
set -euo pipefail

MODEL=${MODEL:-facebook/deit-tiny-patch16-224}
SYNTHESIZER=${SYNTHESIZER:-psaq}
NUM_GPUS=${NUM_GPUS:-8}
NUM_IMAGES=${NUM_IMAGES:-256}
OUTPUT=${OUTPUT:-calib/$(basename "$MODEL")-$SYNTHESIZER}

accelerate launch --multi_gpu --num_processes "$NUM_GPUS" "$(dirname "$0")/synthesize_multi_gpu.py" \
    --model "$MODEL" --synthesizer "$SYNTHESIZER" --num-images "$NUM_IMAGES" --output "$OUTPUT" "$@"
