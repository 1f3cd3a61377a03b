#!/usr/bin/env bash
# Issue 10 (fair comparisons): zero-shot accuracy of the compared methods on SmolLM2-135M,
# six tasks through lm-eval, the first 400 documents of each (batch-invariant scoring: README
# "Zero-shot accuracy"), with the first 16 x 512 WikiText-2 test windows beside them.
#   GPTQ family at g64 (calibration 32 x 512, seed 0, as gptq_family.sh): FP, GPTQ W4, PB-LLM,
#   SpikeLLM ternary (the default design, element saliency).
#   OmniQuant pipeline W4A4, K per token, SpikeLLM's recipe (reduced CPU recipe, seed 1, as
#   omni_w4a4.sh): OmniQuant and SpikeLLM t2.
#   SPIKELLM_DATA_DIR=../shared/data bash bench/issue10/zeroshot.sh
#   GSEEDS="0 1 2" (GPTQ family calibration seeds) and OSEEDS="1 2 3" (OmniQuant pipeline seeds,
#   as omni_w4a4.sh) are the defaults; set either to a subset to add seeds (empty: skip the family).
# then: python bench/issue10/summarize.py outputs/issue10_zs
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/issue10_zs}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
: "${SPIKELLM_DATA_DIR:?set SPIKELLM_DATA_DIR}"
source bench/common/zeroshot.sh  # ZS: the zero-shot protocol
G="launcher=local logger=none progress=false paths.outputs=$OUT quant.group_size=64 calib.nsamples=32 calib.seqlen=512"
O="launcher=local logger=none progress=false paths.outputs=$OUT quant=omniquant quant.wbits=4 quant.abits=4 quant.epochs=2 calib.nsamples=8 calib.seqlen=256 quant.k_axis=token quant.let_lr=0.001 quant.alpha=0.75 quant.aug_loss=false"
GSEEDS=${GSEEDS-0 1 2}
OSEEDS=${OSEEDS-1 2 3}
for s in $GSEEDS; do
  $PY -m pipelines.run -m $G calib.seed=$s $ZS quant=gptq quant.wbits=4 spiking=none
  $PY -m pipelines.run -m $G calib.seed=$s $ZS quant=pbllm spiking=none
  $PY -m pipelines.run -m $G calib.seed=$s $ZS quant=gptq spiking=ternary
done
for s in $OSEEDS; do
  $PY -m pipelines.run -m $O calib.seed=$s quant.seed=$s $ZS spiking=none,t2
done
