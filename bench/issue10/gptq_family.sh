#!/usr/bin/env bash
# Issue 10 (fair comparisons), GPTQ pipeline on SmolLM2-135M: every method at one granularity
# (quant.group_size=$1: 0 = per row, 64 = per 64 columns; the ternary thresholds follow it),
# calibration 32 x 512 WikiText-2 validation windows (dev tail held out), evaluated on the dev
# split (16 x 512), WikiText-2 test (first 16 x 512) and a second corpus (PTB test as a text
# file, C4 validation; 8 x 512 each). Quantized models are cached and shared by the evaluations.
#   SPIKELLM_DATA_DIR=../shared/data bash bench/issue10/gptq_family.sh 0    (and 64)
#   SEEDS="2" ... runs only those calibration seeds (default "0 1 2"), e.g. to add a seed.
#   PARTS="corpus" ... runs only the second-corpus evaluations (default "devtest corpus").
# Order: per seed in SEEDS, dev then test (seed 0 adds RTN: it reads no calibration data, so
# its seeds are identical); then the second corpus for the same seeds.
set -uo pipefail
cd "$(dirname "$0")/../.."
G=${1:?group size}
OUT=${OUT:-outputs/issue10}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=${SPIKELLM_DATA_DIR:?set SPIKELLM_DATA_DIR}
common="launcher=local logger=none progress=false paths.outputs=$OUT quant.group_size=$G calib.nsamples=32 calib.seqlen=512"
DEV="eval.split=dev eval.datasets=[wikitext2] eval.max_windows=16"
TEST="eval.split=test eval.datasets=[wikitext2] eval.max_windows=16"
CORPUS="eval.split=test eval.datasets=[$DATA/ptb/ptb.test.txt,c4] eval.max_windows=8"
rtn()     { $PY -m pipelines.run -m $common calib.seed=$1 ${@:2} quant=rtn quant.wbits=2,3 spiking=none; }
gptq()    { $PY -m pipelines.run -m $common calib.seed=$1 ${@:2} quant=gptq quant.wbits=2,3 spiking=none; }
pbllm()   { $PY -m pipelines.run -m $common calib.seed=$1 ${@:2} quant=pbllm spiking=none; }
ternary() { $PY -m pipelines.run -m $common calib.seed=$1 ${@:2} quant=gptq spiking=ternary \
              spiking.granularity=element,column spiking.select=saliency,random; }
all()     { rtn "$@"; gptq "$@"; pbllm "$@"; ternary "$@"; }
seeded()  { gptq "$@"; pbllm "$@"; ternary "$@"; }
SEEDS=${SEEDS:-0 1 2}
PARTS=${PARTS:-devtest corpus}
if [[ " $PARTS " == *" devtest "* ]]; then
  for s in $SEEDS; do
    if [ "$s" = 0 ]; then all 0 $DEV; all 0 $TEST; else seeded $s $DEV; seeded $s $TEST; fi
  done
fi
if [[ " $PARTS " == *" corpus "* ]]; then
  for s in $SEEDS; do
    if [ "$s" = 0 ]; then all 0 $CORPUS; else seeded $s $CORPUS; fi
  done
fi
