#!/usr/bin/env bash
# Issue 14 (rotations): the orientation rows of the README's rotation section, W4A8KV4 and
# W3A16 on SmolLM2-135M, each on the dev split (16 x 512 held-out WikiText-2 validation
# windows) and the test split (first 16 x 512 test windows).
#   GPTQ pipeline, QuaRot's settings (experiment=quarot_w4a4 with the bits changed; calibration
#   32 x 512, seed s, the rotation and spiking seeds follow it):
#     W4A8KV4: RTN, QuaRot-RTN, QuaRot-GPTQ, QuaRot-GPTQ + SpikeLLM t2 (saliency, random);
#     W3A16:   RTN, GPTQ, QuaRot-RTN, QuaRot-GPTQ (weights only: no activation spikes).
#   OmniQuant pipeline, the reduced CPU recipe (8 x 256, 2 epochs, SpikeLLM's recipe, K per token,
#   seed s + 1 as the issue-10 table): OmniQuant and SpikeLLM t2 at W4A8 and W3A16 (at A16
#   SpikeLLM's GIF steps go to the weights).
#   SPIKELLM_DATA_DIR=../shared/data bash bench/issue14/orientation.sh     (SEEDS="0 1 2")
# then: python bench/issue10/summarize.py outputs/issue14 --time
set -uo pipefail
source "$(dirname "$0")/common.sh"
SEEDS=${SEEDS:-0 1 2}
common="launcher=local logger=none progress=false paths.outputs=$OUT eval.seqlen=512 eval.max_windows=16 eval.datasets=[wikitext2]"
O="quant=omniquant quant.epochs=2 calib.nsamples=8 calib.seqlen=256 quant.k_axis=token quant.let_lr=0.001 quant.alpha=0.75 quant.aug_loss=false"
run() { $PY -m pipelines.run -m $common "$@"; }
for s in $SEEDS; do
  os=$((s + 1))
  for split in dev test; do
    W48="$QUAROT calib.seed=$s quant.wbits=4 quant.abits=8 eval.split=$split"
    run $W48 rotate.seed=$s quant=rtn,gptq spiking=none
    run $W48 rotate=none quant=rtn spiking=none
    run $W48 rotate.seed=$s spiking.seed=$s quant=gptq spiking=t2 spiking.select=saliency,random
    W316="$QUAROT calib.seed=$s quant.wbits=3 quant.abits=16 quant.kv_bits=null eval.split=$split"
    run $W316 rotate.seed=$s quant=rtn,gptq spiking=none
    run $W316 rotate=none quant=rtn,gptq spiking=none
    run $O calib.seed=$os quant.seed=$os quant.wbits=4 quant.abits=8 eval.split=$split spiking=none,t2
    run $O calib.seed=$os quant.seed=$os quant.wbits=3 quant.abits=16 eval.split=$split spiking=none,t2
  done
done
