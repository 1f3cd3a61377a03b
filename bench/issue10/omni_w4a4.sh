#!/usr/bin/env bash
# Issue 10 (fair comparisons), OmniQuant pipeline W4A4 on SmolLM2-135M, reduced CPU recipe
# (8 x 256 WikiText-2 validation calibration windows, dev tail held out; 2 epochs; batch 1),
# evaluated on the dev split (16 x 512) and WikiText-2 test (first 16 x 512).
# Both recipes for both methods (the baseline is tuned at least as hard as the method):
#   S = SpikeLLM's (arun.sh): let_lr 1e-3, alpha 0.75, no aug_loss
#   O = OmniQuant's own LLaMA-1 W4A4 (scripts/llama/llama-7b/w4a4.sh): let_lr 5e-3, alpha 0.5, aug_loss
#   SEEDS="1 2 3" SPIKELLM_DATA_DIR=../shared/data bash bench/issue10/omni_w4a4.sh
set -uo pipefail
source "$(dirname "$0")/omni_recipe.sh"
DEV="eval.split=dev eval.datasets=[wikitext2] eval.max_windows=16 eval.seqlen=512"
TEST="eval.split=test eval.datasets=[wikitext2] eval.max_windows=16 eval.seqlen=512"
# Order: the causal (token) rows for every seed first, then the per-channel K rows.
PART=${PART:-all}
case $PART in all|channel_rest) ;; *) echo "PART: all or channel_rest" >&2; exit 2 ;; esac
if [ "$PART" = all ]; then
for s in $SEEDS; do
  for ev in "$DEV" "$TEST"; do
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=token spiking=none,t2 $S
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=token spiking=none $O
  done
  for ev in "$DEV" "$TEST"; do
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=token spiking=t4 $S
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=token spiking=t2 spiking.select=random $S
  done
done
for s in $SEEDS; do
  for ev in "$DEV" "$TEST"; do
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=token spiking=t2 $O
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=channel_static,channel spiking=none,t2 $S
  done
done
fi
# the per-channel K rows of the rest of the grid: OmniQuant's own recipe, t4 and t2 random
# (PART=channel_rest runs only these)
for s in $SEEDS; do
  for ev in "$DEV" "$TEST"; do
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=channel_static,channel spiking=none $O
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=channel_static,channel spiking=t4 $S
    sweep calib.seed=$s quant.seed=$s $ev quant.k_axis=channel_static,channel spiking=t2 spiking.select=random $S
  done
done
