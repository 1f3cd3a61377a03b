#!/usr/bin/env bash
# Issue 13 (fit the ecosystem): every habit the issue names, tried through the real CLI as a
# user would, one table row each (check, command, exit status, what it printed: the last line,
# or the line that answers the check). Real components: the embedded SmolLM2-135M at reduced
# sizes, the local single-node SLURM (slurm/cluster.sh), W&B offline, lm-eval, Chromium.
#   SPIKELLM_DATA_DIR=../shared/data bash bench/issue13/checks.sh [out.md]   (about 15 minutes)
# Writes the table to out.md (default bench/results/issue13_checks.md) and work to $W.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTMD=${1:-bench/results/issue13_checks.md}
PY=${PY:-.venv/bin/python}
W=${W:-/tmp/spikellm-issue13}
: "${SPIKELLM_DATA_DIR:?set SPIKELLM_DATA_DIR}"
rm -rf "$W" && mkdir -p "$W"
R="paths.outputs=$W/out calib.nsamples=4 calib.seqlen=128 eval.seqlen=128 eval.max_windows=2 progress=false logger=none"
RTN="quant=rtn spiking=none quant.wbits=3"
run() { $PY -m pipelines.run "$@"; }
rows=()
# check NAME GREP CMD...: run CMD, keep its exit status and the last output line matching GREP
# (or the last line when GREP is empty)
check() {
  local name=$1 pat=$2; shift 2
  local log="$W/log.$((${#rows[@]} + 1))"
  "$@" > "$log" 2>&1
  local rc=$?
  local line
  if [ -n "$pat" ]; then line=$(grep -E -- "$pat" "$log" | tail -1); else line=$(grep -v '^\s*$' "$log" | grep -v 'Loading weights' | tail -1); fi
  line=${line//|/\\|}
  local cmd="$*"; cmd=${cmd/#run /python -m pipelines.run }; cmd=${cmd//$PY/python}
  cmd=${cmd//$R/\$R}; cmd=${cmd//$RTN/\$RTN}; cmd=${cmd//$W/\$W}; cmd=${cmd//|/\\|}; cmd=${cmd//$'\n'/ }
  rows+=("| $name | \`${cmd:0:240}\` | $rc | ${line:0:240} |")
  echo "[$rc] $name: ${line:0:160}" >&2
}

# --- Hydra flags ----------------------------------------------------------------------------
check "--help: groups, options, app help" "^  quant " run --help
check "--cfg job" "^quant:" run --cfg job
check "--cfg hydra" "^hydra:" run --cfg hydra
check "--cfg all --resolve" "outputs:" run --cfg all --resolve
check "--package" "wbits" run --cfg job --package quant quant=rtn
check "-c (short --cfg)" "^model:" run -c job
check "--info" "" run --info
check "--info searchpath" "" run --info searchpath
check "--shell-completion install=bash" "complete" run --shell-completion install=bash
check "completion answers in real bash" "" bash -c "eval \"\$($PY -m pipelines.run -sc install=bash)\"; COMP_WORDS=(python -m pipelines.run quant=g); COMP_CWORD=3; COMP_LINE='python -m pipelines.run quant=g'; COMP_POINT=\${#COMP_LINE}; _spikellm_pipelines_run 2>/dev/null || true; complete -p | grep -c pipelines; echo \"\${COMPREPLY[*]}\""
mkdir -p "$W/userconf/model"
sed 's/name: smollm2_135m/name: mymodel/' conf/model/smollm2_135m.yaml > "$W/userconf/model/mymodel.yaml"
check "--config-dir: a user's model/mymodel.yaml" "name:" run -cd "$W/userconf" model=mymodel --cfg job --package model
check "hydra.searchpath" "name:" run "hydra.searchpath=[file://$W/userconf]" model=mymodel --cfg job --package model
check "hydra.run.dir (a real RTN run)" "results:" run $R $RTN "hydra.run.dir=$W/myrun"
check "  ... the run directory is it" "" ls "$W/myrun"
check "hydra.sweep.dir (-m, 2 points)" "stages (done|cached)" run -m $R $RTN quant.wbits=3,4 "hydra.sweep.dir=$W/mysweep"
check "  ... point n in <sweep.dir>/<n>" "" ls "$W/mysweep"
check "hydra.run.dir with -m" "" run -m $R "hydra.run.dir=$W/x" quant.wbits=3,4
check "~key (deletion)" "" run $R "~eval.tasks"
check "interval() sweep" "" run -m $R "quant.wbits=interval(2,4)"
check "hydra/launcher=submitit_slurm" "" run $R hydra/launcher=submitit_slurm
check "hydra.launcher.*" "" run $R hydra.launcher.partition=gpu

# --- launchers and SLURM --------------------------------------------------------------------
check "launcher=auto says what it chose" "launcher" env PATH=/usr/bin:/bin $PY -m pipelines.run $R $RTN launcher=auto
check "launcher=local + a SLURM-only key" "" run $R $RTN launcher=local launcher.partition=gpu
check "launcher=slurm with no SLURM" "" env PATH=/usr/bin:/bin $PY -m pipelines.run $R $RTN launcher=slurm
bash slurm/cluster.sh start > "$W/slurm.log" 2>&1
# shellcheck disable=SC1090
source "${SPIKELLM_SLURM_DIR:-/tmp/spikellm-slurm}/env.sh"
check "launcher=slurm, knobs, wait (2-point sweep)" "stages (done|cached)|error" run -m $R quant=rtn spiking=none quant.wbits=2,5 launcher=slurm launcher.wait=true \
  "launcher.setup=['export SPIKELLM_DATA_DIR=$SPIKELLM_DATA_DIR']" launcher.cpu_jobs.mem_gb=2 "hydra.sweep.dir=$W/slurmsweep"
check "pipelines.status <sweep> (job ids, logs, elapsed)" "quantize" $PY -m pipelines.status "$W/slurmsweep"
check "pipelines.status --latest" "total" $PY -m pipelines.status --latest "$W/out"
check "submit without waiting" "" run -m $R quant=gptq spiking=none quant.wbits=2,3 launcher=slurm \
  "launcher.setup=['export SPIKELLM_DATA_DIR=$SPIKELLM_DATA_DIR']" "hydra.sweep.dir=$W/tocancel"
check "  ... queued, job names carry the sweep id" "" bash -c "squeue -h -o '%i %j %T' | sort | tr '\n' ';'"
check "pipelines.cancel <sweep>" "" $PY -m pipelines.cancel "$W/tocancel"
check "  ... that sweep's jobs left the queue" "" bash -c "sleep 5; squeue -h | grep -c . || true"
bash slurm/cluster.sh stop >> "$W/slurm.log" 2>&1

# --- W&B, report ----------------------------------------------------------------------------
check "W&B offline 2-point sweep" "stages (done|cached)" run -m $R $RTN quant.wbits=3,4 logger=wandb "hydra.sweep.dir=$W/wbsweep"
check "  ... point runs carry ppl + cost + swept keys" "" $PY -c "
import sys
from pipelines.wandb_offline import find_runs, read_run
runs = [read_run(f) for f in find_runs('$W/wbsweep')]
pts = [r for r in runs if r['run']['job_type'] == 'point']
print(len(pts), 'point runs:', [(r['run']['name'], round(r['summary']['ppl/wikitext2'], 2), round(r['summary']['cost/ace_rel_fp16'], 4),
      r['config'].get('quant.wbits')) for r in pts], '; stage runs:', sorted({r['run']['name'] for r in runs if r['run']['job_type'] != 'point'}))"
check "report: matplotlib PNGs next to the HTML" "" bash -c "$PY -m pipelines.report $W/wbsweep > /dev/null && ls $W/wbsweep | grep -E 'png|html' | tr '\n' ' '"
check "report in headless Chromium" "" $PY bench/report_screenshot.py "$W/wbsweep" "$W/report.png"

# --- export ---------------------------------------------------------------------------------
check "save_model=true on a cached quantize" "export" run $R $RTN save_model=true
check "  ... the model is in the run directory" "" bash -c "m=\$(ls -t $W/out/runs/*/*/manifest.json | head -1); ls \$(dirname \$m) | tr '\\n' ' '; ls \$(dirname \$m)/model | tr '\\n' ' '"
check "W4A4 t2 packed export" "export/packed_bits" run $R quant=omniquant quant.wbits=4 quant.abits=4 quant.epochs=1 spiking=t2 \
  eval.fp_baseline=false save_model=true save_format=packed
check "  ... reloaded ppl (load_quantized) vs reported; plain load" "" $PY -c "
import glob, json, sys
sys.path.insert(0, 'tests')
from pathlib import Path
from test_pipeline import _reloaded_ppl
m = [m for m in (json.load(open(f)) for f in sorted(glob.glob('$W/out/runs/*/*/manifest.json'))) if m['config']['save_format'] == 'packed']
m = m[-1]
r = _reloaded_ppl(Path(m['model_dir']), plain=False)
try:
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(m['model_dir']); plain = 'plain load WORKED'
except ValueError as e:
    plain = 'plain load: ' + str(e).split('.')[0]
print(f\"reported {m['metrics']['ppl/wikitext2']:.4f}, reloaded {r:.4f}; storage_bits {m['metrics']['cost/storage_bits']:.3f}, packed file {m['metrics']['export/packed_bits']:.3f} bits/weight; {plain}\")"
check "save_format=packed without save_model" "" run $R save_format=packed

# --- lm-eval ----------------------------------------------------------------------------------
check "eval.tasks: a task lm-eval knows, offline" "" run $R $RTN "eval.tasks=[mmlu_anatomy]"
check "eval.tasks: an unknown task" "" run $R $RTN "eval.tasks=[no_such_task]"
check "eval.num_fewshot + acc_stderr + lm-eval JSON" "results:" run $R $RTN "eval.tasks=[arc_easy]" eval.limit=8 eval.num_fewshot=1
check "  ... in the manifest and the artifact" "" $PY -c "
import glob, json, os
f = max(glob.glob('$W/out/runs/*/*/manifest.json'), key=os.path.getmtime)
m = json.load(open(f))
print({k: round(v, 4) for k, v in m['metrics'].items() if 'arc_easy' in k}, [os.path.basename(p) for p in glob.glob('$W/out/cache/evaluate/*/lm_eval*')][:1])"

# --- progress --------------------------------------------------------------------------------
check "per-block bar (RTN) and one line per stage" "" bash -c "$PY -m pipelines.run paths.outputs=$W/out2 calib.nsamples=4 calib.seqlen=128 eval.seqlen=128 eval.max_windows=2 $RTN logger=none 2>&1 | tr '\\r' '\\n' | grep -E '^rtn: +100%|stage quantize' | tail -2 | tr '\\n' ' '"

{
  echo "# Issue 13 checks ($(date -u +%F), $(git rev-parse --short HEAD))"
  echo
  echo "Produced by \`bash bench/issue13/checks.sh\`; \$R = \`$R\`, \$RTN = \`$RTN\` (\$W = $W)."
  echo
  echo "| check | command | exit | output (last line, or the line that answers) |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} > "$OUTMD"
echo "$OUTMD"
