#!/usr/bin/env bash
# Issue 14 (rotations) on SmolLM2-135M: the W4A4 table, each row on the dev split (16 x 512
# held-out WikiText-2 validation windows) and the test split (first 16 x 512 test windows).
#   GPTQ pipeline, QuaRot's settings (experiment=quarot_w4a4: per-channel symmetric weights with
#   the clip search, A4 per token clip 0.9, KV4 clip 0.95), calibration 32 x 512 (seed s; the
#   rotation seed follows it): QuaRot-RTN, QuaRot-GPTQ, QuaRot-GPTQ + SpikeLLM t2/t4 (saliency,
#   random), and the same grid without rotation (RTN, GPTQ, GPTQ + t2/t4).
#   OmniQuant pipeline, the reduced CPU recipe of the issue-10 W4A4 table (8 x 256, 2 epochs,
#   SpikeLLM's recipe, K per token): OmniQuant, SpikeLLM t2/t4 (saliency, random).
#   SPIKELLM_DATA_DIR=../shared/data bash bench/issue14/quarot.sh
#   SEEDS="0" PARTS="gptq omni" REGIME=w4a4 (w4a8 | w3a16 for the orientation rows)
#   UNROTATED=rtn: of the unrotated GPTQ-pipeline rows only RTN (default all: RTN, GPTQ, GPTQ + t2/t4)
# then: python bench/issue10/summarize.py outputs/issue14 --time (--family w4a4 for the GPTQ rows)
set -uo pipefail
source "$(dirname "$0")/common.sh"
SEEDS=${SEEDS:-0 1 2}
PARTS=${PARTS:-gptq omni}
REGIME=${REGIME:-w4a4}
UNROTATED=${UNROTATED:-all}
case $UNROTATED in all|rtn) ;; *) echo "UNROTATED: all or rtn" >&2; exit 2 ;; esac
UNROT_Q=$([ "$UNROTATED" = rtn ] && echo rtn || echo rtn,gptq)
case $REGIME in
  w4a4)  W=4; A=4 ;;
  w4a8)  W=4; A=8 ;;
  w3a16) W=3; A=16 ;;
  *) echo "REGIME: w4a4, w4a8 or w3a16" >&2; exit 2 ;;
esac
common="launcher=local logger=none progress=false paths.outputs=$OUT eval.seqlen=512 eval.max_windows=16 eval.datasets=[wikitext2]"
G="$QUAROT quant.wbits=$W quant.abits=$A"
[ "$A" = 16 ] && G="$G quant.kv_bits=null"
O="quant=omniquant quant.wbits=$W quant.abits=$A quant.epochs=2 calib.nsamples=8 calib.seqlen=256 quant.k_axis=token quant.let_lr=0.001 quant.alpha=0.75 quant.aug_loss=false"
run() { $PY -m pipelines.run -m $common "$@"; }
for s in $SEEDS; do
  for split in dev test; do
    if [[ " $PARTS " == *" gptq "* ]]; then
      run $G calib.seed=$s rotate.seed=$s eval.split=$split quant=rtn,gptq spiking=none
      run $G calib.seed=$s eval.split=$split rotate=none quant=$UNROT_Q spiking=none
      if [ "$A" != 16 ]; then        # GIF spiking of quantized activations (none at A16)
        run $G calib.seed=$s rotate.seed=$s spiking.seed=$s eval.split=$split quant=gptq spiking=t2,t4 spiking.select=saliency,random
        [ "$UNROTATED" = rtn ] || run $G calib.seed=$s eval.split=$split rotate=none quant=gptq spiking=t2,t4
      fi
    fi
    if [[ " $PARTS " == *" omni "* ]]; then
      os=$((s + 1))                 # the issue-10 table's OmniQuant seeds are 1, 2, 3
      # spiking.seed only where spiking is on (spiking=none has no seed); the random
      # selections keep the default spiking.seed, as the issue-10 table's t2 random
      run $O calib.seed=$os quant.seed=$os eval.split=$split spiking=none,t2,t4
      run $O calib.seed=$os quant.seed=$os eval.split=$split spiking=t2,t4 spiking.select=random
    fi
  done
done
