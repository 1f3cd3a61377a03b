#!/usr/bin/env bash
# Issue 16 (measured spiking) on SmolLM2-135M: spikes counted (eval.spikes=true) on the first
# $SW of the 16 x 512 WikiText-2 test windows for FP16 (formula only), GPTQ W4 g64, SpikeLLM
# ternary (the default design, 20% x 3, g64), OmniQuant W4A4 (integer: one GIF step), SpikeLLM
# W4A4 t2 and t4 (reduced CPU recipe of the W4A4 table: 8 x 256, 2 epochs, K per token, seed 1),
# and QuaRot-GPTQ W4A4KV4 + SpikeLLM t2 (experiment=quarot_w4a4, 32 x 512, seed 0).
#   SPIKELLM_DATA_DIR=../shared/data bash bench/issue16/spikes.sh
# then: python -m pipelines.report <each sweep dir>, and python bench/issue16/table.py outputs/issue16
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/issue16}
PY=${PY:-.venv/bin/python}
SW=${SW:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
: "${SPIKELLM_DATA_DIR:?set SPIKELLM_DATA_DIR}"
E="launcher=local logger=none progress=false paths.outputs=$OUT eval.split=test eval.datasets=[wikitext2] eval.seqlen=512 eval.max_windows=16 eval.spikes=true eval.spike_windows=$SW"
G="quant.group_size=64 calib.nsamples=32 calib.seqlen=512 calib.seed=0"
O="quant=omniquant quant.wbits=4 quant.abits=4 quant.epochs=2 calib.nsamples=8 calib.seqlen=256 calib.seed=1 quant.seed=1 quant.k_axis=token quant.let_lr=0.001 quant.alpha=0.75 quant.aug_loss=false"
$PY -m pipelines.run -m $E $G quant=gptq quant.wbits=4 spiking=none,ternary
$PY -m pipelines.run -m $E $O spiking=none,t2,t4
$PY -m pipelines.run -m $E experiment=quarot_w4a4 calib.nsamples=32 calib.seqlen=512 calib.seed=0 spiking=t2
