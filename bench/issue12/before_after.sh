#!/bin/bash
# Issue 12's before/after: the same workloads in two source trees, interleaved on one machine,
# each from an empty results store (every stage computed), default threads.
#   bash bench/issue12/before_after.sh /work/before /work/after /tmp/ba > ba.tsv
#   WORKLOADS="main omni_cpu" ORDER="after before" REP=2 ... repeats a subset, in another order.
# Prints: workload, tree, wall_s (whole command), max RSS (KB), and the run's log lines with ppl.
set -u
BEFORE=$1; AFTER=$2; OUT=$3
mkdir -p "$OUT"
export SPIKELLM_DATA_DIR=${SPIKELLM_DATA_DIR:-/work/shared/data} WANDB_MODE=offline
declare -A W=(
  [main]=""
  [gptq_w3]="quant=gptq quant.wbits=3 spiking=none"
  [omni_cpu]="experiment=omni_cpu -m"
)
for w in ${WORKLOADS:-main gptq_w3 omni_cpu}; do
  for t in ${ORDER:-before after}; do
    tree=$BEFORE; [ $t = after ] && tree=$AFTER
    d=$OUT/$w.$t${REP:+.$REP}
    rm -rf "$d"; mkdir -p "$d"
    (cd "$tree" && /usr/bin/time -f "%e %M" -o "$d/time" .venv/bin/python -m pipelines.run \
        paths.outputs="$d/store" launcher=local progress=false ${W[$w]} > "$d/log" 2>&1)
    read wall rss < "$d/time"
    echo -e "$w\t$t${REP:+.$REP}\t$wall\t$rss\t$(grep -E 'ppl/[a-z0-9_/]+ =|stages done' "$d/log" | tr '\n' ' ')"
  done
done
