#!/usr/bin/env bash
# CPU proxy of the paper's comparison on the embedded digits data (NOT ImageNet): 4 activations x
# ShuffleNetV2 0.5x x 2 seeds, then the comparison table, the training curves and the beta figures.
#   scripts/proxy_sweep.sh [OUT_DIR=runs] [FIGURES_DIR=docs/proxy]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
DOCS=${2:-docs/proxy}
SWEEP="$OUT/proxy_digits"
RUN="$SWEEP/digits-shufflenetv2_x0_5_small"
start=$(date +%s)

python train.py -m experiment=proxy_digits activation=relu,swish,acon_c,meta_acon seed=0,1 \
  out_dir="$OUT" sweep_name=proxy_digits
python scripts/make_table.py "$SWEEP" --out "$DOCS" --no-hparams
python scripts/make_table.py "$SWEEP" --out "$SWEEP" >/dev/null   # table + TensorBoard HParams next to the runs
python scripts/plot_curves.py "$SWEEP" --out "$DOCS"
python scripts/plot_beta.py "$RUN-acon_c-s0/last.pt" "$RUN-meta_acon-s0/last.pt" --out "$DOCS"

echo "proxy sweep finished in $(($(date +%s) - start)) s; table and figures in $DOCS," \
  "HParams: tensorboard --logdir $SWEEP/hparams"
