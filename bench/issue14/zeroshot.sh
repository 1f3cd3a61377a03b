#!/usr/bin/env bash
# Issue 14 (rotations): zero-shot accuracy of the best rotated W4A4 rows on SmolLM2-135M, six
# tasks through lm-eval, the first 400 documents of each (batch-invariant scoring), with the
# first 16 x 512 WikiText-2 test windows beside them; FP comes along as acc/fp/*.
#   QuaRot-GPTQ W4A4KV4 and QuaRot-GPTQ + SpikeLLM t2 (saliency), the settings of quarot.sh
#   (experiment=quarot_w4a4, calibration 32 x 512, seed s; the rotation and spiking seeds follow it).
#   SPIKELLM_DATA_DIR=../shared/data bash bench/issue14/zeroshot.sh     (SEEDS="0" by default)
# Run it on the store of quarot.sh (OUT=outputs/issue14) and the quantizations are reused.
# then: python bench/issue10/summarize.py outputs/issue14 --family w4a4
set -uo pipefail
source "$(dirname "$0")/common.sh"
SEEDS=${SEEDS:-0}
source bench/common/zeroshot.sh  # ZS: the zero-shot protocol
G="launcher=local logger=none progress=false paths.outputs=$OUT $QUAROT quant.wbits=4 quant.abits=4"
for s in $SEEDS; do
  $PY -m pipelines.run -m $G calib.seed=$s rotate.seed=$s $ZS quant=gptq spiking=none
  $PY -m pipelines.run -m $G calib.seed=$s rotate.seed=$s spiking.seed=$s $ZS quant=gptq spiking=t2 spiking.select=saliency
done
