# Shared by the issue-14 bench scripts (sourced): the repository root, the store, the
# interpreter, and QuaRot's GPTQ-pipeline recipe on SmolLM2-135M (calibration 32 x 512).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-outputs/issue14}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
: "${SPIKELLM_DATA_DIR:?set SPIKELLM_DATA_DIR}"
QUAROT="experiment=quarot_w4a4 calib.nsamples=32 calib.seqlen=512"
