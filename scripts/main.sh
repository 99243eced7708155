#!/usr/bin/env bash
# The main job: train the default VAE on dynamically binarized Fashion-MNIST, evaluate it, write pictures.
# Usage: scripts/main.sh [RUN_DIR]   (default runs/fashion-vae-DATE-TIME; EPOCHS=N to change the length, default
# the VAE's 36: about 3 minutes of training on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/get-data.sh
run=${1:-runs/fashion-vae-$(date +%Y%m%d-%H%M%S)}
elbox=.venv/bin/elbox
$elbox train --model vae --data fashion-mnist ${EPOCHS:+--epochs "$EPOCHS"} --out "$run"
$elbox evaluate "$run" --split test --iw-samples "${IW_SAMPLES:-100}"
$elbox sample "$run" --n 64 --out "$run/samples.png"
$elbox reconstruct "$run" --out "$run/reconstructions.png"
echo "main: done; results in $run (eval-test.json, samples.png, reconstructions.png, metrics.jsonl)"
