# Sourced by omni_w4a4.sh and omni_corpus.sh: the one definition of issue 10's reduced CPU
# W4A4 recipe (8 x 256 calibration, 2 epochs) and of both published training recipes:
#   S = SpikeLLM's (arun.sh): let_lr 1e-3, alpha 0.75, no aug_loss
#   O = OmniQuant's own LLaMA-1 W4A4 (scripts/llama/llama-7b/w4a4.sh): let_lr 5e-3, alpha 0.5, aug_loss
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-outputs/issue10_omni}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=${SPIKELLM_DATA_DIR:?set SPIKELLM_DATA_DIR}
common="launcher=local logger=none progress=false paths.outputs=$OUT quant=omniquant quant.wbits=4 quant.abits=4 quant.epochs=2 calib.nsamples=8 calib.seqlen=256"
S="quant.let_lr=0.001 quant.alpha=0.75 quant.aug_loss=false"
O="quant.let_lr=0.005 quant.alpha=0.5 quant.aug_loss=true"
sweep() { $PY -m pipelines.run -m $common "$@"; }
