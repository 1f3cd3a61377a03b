#!/usr/bin/env bash
# Issue 10 (fair comparisons): the OmniQuant-pipeline W4A4 rows (K per token) on a second corpus,
# PTB test (as a text file, item 6) and C4 validation, 8 x 512 windows each; the quantized models
# are the ones omni_w4a4.sh cached in the same store (run it first, same OUT and SEEDS).
#   SEEDS="1 2 3" SPIKELLM_DATA_DIR=../shared/data bash bench/issue10/omni_corpus.sh
set -uo pipefail
source "$(dirname "$0")/omni_recipe.sh"
CORPUS="eval.split=test eval.datasets=[$DATA/ptb/ptb.test.txt,c4] eval.max_windows=8 eval.seqlen=512"
for s in $SEEDS; do
  sweep calib.seed=$s quant.seed=$s $CORPUS quant.k_axis=token spiking=none,t2,t4 $S
  sweep calib.seed=$s quant.seed=$s $CORPUS quant.k_axis=token spiking=t2 spiking.select=random $S
  sweep calib.seed=$s quant.seed=$s $CORPUS quant.k_axis=token spiking=none,t2 $O
done
