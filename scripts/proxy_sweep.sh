#!/usr/bin/env bash
# CPU proxy of the paper's comparison on the embedded digits data (NOT ImageNet): 4 activations x
# ShuffleNetV2 0.5x x 2 seeds, then the comparison table, the training curves and the beta figures.
#
#   scripts/proxy_sweep.sh [--activations A,B,..] [--out OUT_DIR] [--update-docs] [--dry-run] [overrides ...]
#
# Runs go to OUT_DIR/proxy_digits (default runs/proxy_digits); the table and figures go next to them.
# --activations   the activation configs (configs/activation/*.yaml) to sweep, comma-separated
#                 (default relu,swish,acon_c,meta_acon; acon_frelu is TFNet's: see proxy_tfnet_digits)
# --update-docs   also regenerate the shipped docs/proxy/ files (table and figures) from this sweep
# --dry-run       print the commands and where they would write, run nothing
# Extra arguments are train.py overrides for every run (e.g. recipe.epochs=1 to try the script quickly);
# PROXY_ACTIVATIONS (same as --activations) and PROXY_SEEDS (0,1) choose the grid. The beta figures need
# acon_c and meta_acon with seed 0 and are skipped when either is not swept.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs
DOCS=""
DRY=0
EXTRA=()
ACTS=${PROXY_ACTIVATIONS:-relu,swish,acon_c,meta_acon}
while [ $# -gt 0 ]; do
  case "$1" in
    --activations) ACTS=$2; shift 2 ;;
    --activations=*) ACTS=${1#--activations=}; shift ;;
    --out) OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --update-docs) DOCS=docs/proxy; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: unknown option $1 (see scripts/proxy_sweep.sh --help)" >&2; exit 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
for act in ${ACTS//,/ }; do
  if [ ! -f "configs/activation/$act.yaml" ]; then
    echo "error: --activations: no activation config $act (configs/activation/$act.yaml);" \
      "valid: $(cd configs/activation && ls ./*.yaml | sed 's|^\./||; s|\.yaml$||' | paste -sd' ' -)" >&2
    exit 2
  fi
done
SEEDS=${PROXY_SEEDS:-0,1}
SWEEP="$OUT/proxy_digits"
FIGURES=${DOCS:-$SWEEP}
RUN="$SWEEP/digits-shufflenetv2_x0_5_small"
start=$(date +%s)

step() {
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

echo "proxy sweep: runs in $SWEEP, table and figures in $FIGURES"
step python train.py -m experiment=proxy_digits "activation=$ACTS" "seed=$SEEDS" \
  out_dir="$OUT" sweep_name=proxy_digits ${EXTRA[@]+"${EXTRA[@]}"}
# table + TensorBoard HParams next to the runs
step python scripts/make_table.py "$SWEEP" --out "$SWEEP" --quiet
if [ "$FIGURES" != "$SWEEP" ]; then
  step python scripts/make_table.py "$SWEEP" --out "$FIGURES" --no-hparams --quiet
fi
step python scripts/plot_curves.py "$SWEEP" --out "$FIGURES"
if [[ ",$ACTS," == *,acon_c,* && ",$ACTS," == *,meta_acon,* && ",$SEEDS," == *,0,* ]]; then
  step python scripts/plot_beta.py "$RUN-acon_c-s0/last.pt" "$RUN-meta_acon-s0/last.pt" --out "$FIGURES"
else
  echo "beta figures skipped: they need acon_c and meta_acon with seed 0 in the sweep"
fi

if [ "$DRY" = 1 ]; then
  echo "dry run: nothing was run or written"
else
  echo "proxy sweep finished in $(($(date +%s) - start)) s; runs in $SWEEP; table and figures in $FIGURES;" \
    "HParams: tensorboard --logdir $SWEEP/hparams"
fi
