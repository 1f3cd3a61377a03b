#!/usr/bin/env bash
# Issue 10 (fair comparisons), GPTQ pipeline on SmolLM2-135M: every method at one granularity
# (quant.group_size=$1: 0 = per row, 64 = per 64 columns; the ternary thresholds follow it),
# 3 calibration seeds (32 x 512 WikiText-2 validation windows, dev tail held out), evaluated on
# the dev split (16 x 512), WikiText-2 test (first 16 x 512) and a second corpus (PTB test as a
# text file, C4 validation; 8 x 512 each). Quantized models are cached and shared by the
# evaluations. Usage: bash bench/issue10/gptq_family.sh 0   (and 64)
set -uo pipefail
cd "$(dirname "$0")/../.."
G=${1:?group size}
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-outputs/issue10}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=${SPIKELLM_DATA_DIR:?set SPIKELLM_DATA_DIR}
common="launcher=local logger=none progress=false paths.outputs=$OUT quant.group_size=$G calib.nsamples=32 calib.seqlen=512"
run() {  # $1 = seed, $2.. = eval overrides
  s=$1; shift
  $PY -m pipelines.run -m $common calib.seed=$s "$@" quant=rtn,gptq quant.wbits=2,3 spiking=none
  $PY -m pipelines.run -m $common calib.seed=$s "$@" quant=pbllm spiking=none
  $PY -m pipelines.run -m $common calib.seed=$s "$@" quant=gptq spiking=ternary \
      spiking.granularity=element,column spiking.select=saliency,random
}
for s in $SEEDS; do
  run $s eval.split=dev eval.datasets=[wikitext2] eval.max_windows=16
  run $s eval.split=test eval.datasets=[wikitext2] eval.max_windows=16
done
for s in $SEEDS; do
  run $s eval.split=test "eval.datasets=[$DATA/ptb/ptb.test.txt,c4]" eval.max_windows=8
done
