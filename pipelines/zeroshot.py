"""Zero-shot (and few-shot) accuracy through lm-eval on the in-memory (quantized) model.

The six tasks of the paper (method.md §6): piqa, arc_easy, arc_challenge, boolq, hellaswag,
winogrande, 0-shot, `acc` (and `acc_norm` where lm-eval reports it). With `data_dir=None` lm-eval
loads its own hub datasets; with a data directory (the layout of `../shared/data`) each task's
local files are converted once into the hub dataset's schema (jsonl under `cache_dir`) and
lm-eval's registered task runs on them unchanged (same prompt, same choices, same metric). Any
other task lm-eval knows runs from the hub (online; preflight refuses it offline in one line,
`check_tasks`). A local task whose files are missing is skipped with a one-line warning here
(the pipeline's preflight refuses it before any work).

HellaSwag's local copy is a cleaned text rendering (query, gold, four endings), not the hub
jsonl: its documents enter with lm-eval's processed fields directly, so its prompt can differ
from lm-eval's in capitalisation of one word (see the data README).

Scores do not depend on the batch size. lm-eval right-pads a batch and calls the model without
an attention mask; under the causal mask a real position never attends to the pads after it,
and every quantizer of a causal model (per-token activations, K per token or against fitted
ranges) reads only its own position, so pads cannot reach a real position. A model with
SpikeLLM's per-channel K (`quant.k_axis=channel`) takes each K range over all the tokens of the
sequence, pads included: such a model is scored one request at a time (`scoring_batch_size`).
What remains is floating point: in float32 a padded batch's matmuls round differently (~1 ulp)
from an unpadded one's, and a low-bit quantizer can turn that into a different code on a rare
token; a float64 model scores the same at every batch size (tests/test_zeroshot.py).
"""
from __future__ import annotations

import bz2
import functools
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable

TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _piqa(d: Path) -> list[dict]:
    docs = _jsonl(d / "piqa" / "valid.jsonl")
    labels = (d / "piqa" / "valid-labels.lst").read_text().split()
    if len(labels) != len(docs):
        raise ValueError(f"piqa: {len(docs)} items but {len(labels)} labels in {d / 'piqa'}")
    return [{"goal": x["goal"], "sol1": x["sol1"], "sol2": x["sol2"], "label": int(y)}
            for x, y in zip(docs, labels)]


def _arc(name: str) -> Callable[[Path], list[dict]]:
    def load(d: Path) -> list[dict]:
        out = []
        for x in _jsonl(d / name.lower().replace("-", "_") / f"{name}-Test.jsonl"):
            ch = x["question"]["choices"]
            out.append({"id": x["id"], "question": x["question"]["stem"], "answerKey": x["answerKey"],
                        "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]}})
        return out
    return load


def _boolq(d: Path) -> list[dict]:
    return [{"question": x["question"], "passage": x["passage"], "idx": x["idx"],
             "label": int(str(x["label"]).lower() in ("true", "1"))}
            for x in _jsonl(d / "boolq" / "val.jsonl")]


def _winogrande(d: Path) -> list[dict]:
    return [{k: x[k] for k in ("sentence", "option1", "option2", "answer")}
            for x in _jsonl(d / "winogrande" / "dev.jsonl")]


def _hellaswag(d: Path) -> list[dict]:
    lines = bz2.decompress((d / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes()) \
        .decode().split("\n")
    lines = lines[: len(lines) // 6 * 6]
    return [{"query": lines[i], "label": int(lines[i + 1]), "gold": int(lines[i + 1]),
             "choices": lines[i + 2: i + 6]} for i in range(0, len(lines), 6)]


#: task -> (local loader, the split lm-eval scores, overrides of lm-eval's task config)
LOCAL: dict[str, tuple[Callable[[Path], list[dict]], str, dict]] = {
    "piqa": (_piqa, "validation", {}),
    "arc_easy": (_arc("ARC-Easy"), "test", {}),
    "arc_challenge": (_arc("ARC-Challenge"), "test", {}),
    "boolq": (_boolq, "validation", {}),
    "winogrande": (_winogrande, "validation", {}),
    "hellaswag": (_hellaswag, "validation", {"process_docs": None}),
}


#: task -> the files under the data directory its local loader reads (their content is hashed
#: into the evaluate stage's key)
TASK_FILES = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl",),
    "boolq": ("boolq/val.jsonl",),
    "winogrande": ("winogrande/dev.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
}


def local_task_specs(tasks: Iterable[str], data_dir: str | Path, cache_dir: str | Path,
                     warn: Callable[[str], None]) -> list:
    """lm-eval task dicts reading the converted local files for the paper's tasks (missing files:
    warned and dropped), the names of the others (lm-eval loads them from the hub)."""
    d, cache = Path(data_dir).expanduser(), Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    specs = []
    for task in tasks:
        if task not in LOCAL:          # lm-eval's own task, from the hub
            specs.append(task)
            continue
        loader, split, extra = LOCAL[task]
        try:
            docs = loader(d)
        except FileNotFoundError as e:
            warn(f"zero-shot task {task}: local data missing ({e.filename}); skipped")
            continue
        path = cache / f"{task}.{split}.jsonl"
        text = "".join(json.dumps(x) + "\n" for x in docs)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        specs.append({"task": task, "dataset_path": "json", "dataset_name": None,
                      "dataset_kwargs": {"data_files": {split: str(path)}},
                      "training_split": None, "validation_split": split if split == "validation" else None,
                      "test_split": split if split == "test" else None, "fewshot_split": None, **extra})
    return specs


def has_non_causal_kv(model) -> bool:
    """True when some attention's K quantization ranges over the whole sequence
    (a `KVQuantizer` with k_axis="channel"): right-padding would enter those ranges."""
    from spikellm.omni_attention import KVQuantizer
    return any(isinstance(m, KVQuantizer) and not m.causal for m in model.modules())


def scoring_batch_size(model, batch_size: int, note: Callable[[str], None]) -> int:
    """The lm-eval batch size that keeps pads out of every quantizer range: `batch_size`, or 1
    (with a one-line `note`) for a model with non-causal K quantization."""
    if batch_size != 1 and has_non_causal_kv(model):
        note(f"zero-shot: scoring one request at a time instead of batches of {batch_size}: "
             f"quant.k_axis=channel takes K ranges over all tokens, so a batch's right-padding "
             f"would change the scores")
        return 1
    return batch_size


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's task index (it reads every task YAML: seconds), built once per process."""
    from lm_eval.tasks import TaskManager
    return TaskManager()


def _build(specs: list, tm) -> list:
    """Task names as they are; local dicts as lm-eval's registered task with our overrides merged
    in (lm-eval merges overrides only when a registered entry is built with them)."""
    out = []
    for spec in specs:
        if isinstance(spec, str):
            out.append(spec)
            continue
        entry = tm._entry(spec["task"])
        if entry is None:
            raise KeyError(f"lm-eval {getattr(__import__('lm_eval'), '__version__', '?')} has no task "
                           f"{spec['task']!r}; install lm-eval>=0.4.8")
        out.append(tm._factory.build(entry, overrides=spec, registry=tm._index))
    return out


def _note(msg: str) -> None:
    print(f"[spikellm] note: {msg}", file=sys.stderr, flush=True)


def run_tasks(model, tokenizer, tasks: Iterable[str], data_dir: str | Path | None,
              cache_dir: str | Path, batch_size: int = 8, limit: int | float | None = None,
              device: str = "cpu", warn: Callable[[str], None] | None = None,
              log_samples: bool = False, num_fewshot: int = 0) -> dict | None:
    """lm-eval's `simple_evaluate` result for `model` on `tasks` with `num_fewshot` in-context
    examples (None when no task has data); with `log_samples` it holds res["samples"][task]: per
    document, its requests' responses (`resps`: [[(loglikelihood, is_greedy)], ...] for multiple
    choice). Standard errors are lm-eval's (analytic for means such as acc)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    warn = warn or (lambda m: print(f"[spikellm] warning: {m}", file=sys.stderr, flush=True))
    if limit is not None and limit >= 1:
        limit = int(limit)
    specs: list = local_task_specs(tasks, data_dir, cache_dir, warn) if data_dir else list(tasks)
    if not specs:
        warn("no zero-shot task has data; nothing scored")
        return None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device,
              batch_size=scoring_batch_size(model, batch_size, _note))
    tm = _task_manager()
    return lm_eval.simple_evaluate(model=lm, tasks=_build(specs, tm), num_fewshot=num_fewshot, limit=limit,
                                   log_samples=log_samples, bootstrap_iters=1000, verbosity="WARNING",
                                   task_manager=tm, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None


def task_metrics(res: dict, tasks: list[str]) -> dict:
    """Our metric names from lm-eval's results: `<metric>/<task>` for every numeric metric of
    the default filter (acc, acc_norm, exact_match, word_perplexity, ...; `<metric>/<task>/<filter>`
    for other filters), `<metric>_stderr/<task>` beside it, `n/<task>` documents scored, and
    `acc/avg` the mean acc of the tasks that report one."""
    out: dict = {}
    for task, r in res["results"].items():
        for name, v in r.items():
            if "," not in name or _number(v) is None:
                continue
            metric, filt = name.split(",", 1)
            suffix = "" if filt == "none" else f"/{filt}"
            out[f"{metric}/{task}{suffix}"] = _number(v)
        n = res.get("n-samples", {}).get(task, {})
        if n:
            out[f"n/{task}"] = int(n.get("effective", n.get("original", 0)))
    accs = [out[f"acc/{t}"] for t in tasks if f"acc/{t}" in out]
    if accs:
        out["acc/avg"] = sum(accs) / len(accs)
    return out


def zero_shot(model, tokenizer, tasks: Iterable[str], data_dir: str | Path | None,
              cache_dir: str | Path, batch_size: int = 8, limit: int | float | None = None,
              device: str = "cpu", warn: Callable[[str], None] | None = None,
              num_fewshot: int = 0, results_file: str | Path | None = None) -> dict:
    """Score `model` (the nn.Module as it is: quantized forwards included) on `tasks`.

    Returns `task_metrics` ({"acc/<task>", "acc_norm/<task>", "acc_stderr/<task>", ...,
    "acc/avg", "n/<task>"}). `limit` caps documents per task (int) or a fraction (float < 1).
    With `results_file`, lm-eval's own results JSON (results, configs, versions, n-samples) is
    written there. The scores do not depend on `batch_size` (module docstring)."""
    tasks = list(tasks)
    res = run_tasks(model, tokenizer, tasks, data_dir, cache_dir, batch_size, limit, device, warn,
                    num_fewshot=num_fewshot)
    if res is None:
        return {}
    if results_file is not None:
        keep = {k: res[k] for k in ("results", "groups", "group_subtasks", "configs", "versions",
                                    "n-shot", "higher_is_better", "n-samples", "config") if k in res}
        Path(results_file).write_text(json.dumps(keep, indent=1, default=str))
    return task_metrics(res, tasks)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """The HuggingFace hub can be reached (not HF_HUB_OFFLINE/HF_DATASETS_OFFLINE, and a TCP
    connection to huggingface.co:443 opens)."""
    import os
    import socket
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_tasks(tasks: Iterable[str], data_dir: str | Path | None) -> None:
    """Raise ValueError (one line, naming the fix) for a task that cannot be scored: one lm-eval
    does not know, a local task whose files are missing, or a hub task while offline."""
    hub = []
    for task in tasks:
        if task in LOCAL and data_dir:
            missing = [f for f in TASK_FILES[task] if not (Path(data_dir).expanduser() / f).exists()]
            if missing:
                raise ValueError(f"eval.tasks: {task}'s local file {missing[0]} is missing in {data_dir}: "
                                 f"add it, or drop {task} from eval.tasks")
        else:
            hub.append(task)
    if not hub:
        return
    known = set(_task_manager().all_tasks)
    unknown = [t for t in hub if t not in known]
    if unknown:
        raise ValueError(f"eval.tasks: lm-eval has no task {unknown[0]!r} "
                         f"(list them with `lm_eval --tasks list`)")
    if not hub_reachable():
        raise ValueError(f"eval.tasks: {hub[0]} has no local files here and the HuggingFace hub is not "
                         f"reachable (offline): local files exist for {', '.join(LOCAL)}")
