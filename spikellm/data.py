"""Calibration and evaluation text, tokenized and windowed as the GPTQ/OmniQuant protocol does.

Text comes from a local data directory (the layout of `../shared/data`, see its README) or,
when no directory is given and the machine is online, from the standard HF datasets. Every
loader returns one string built exactly as GPTQ builds it, `"\\n\\n".join(rows)`, which is
tokenized in one call and cut into non-overlapping `seqlen` windows (evaluation) or seeded
random windows (calibration). GPTQ's "wikitext2" evaluates on test, its "ptb" on the PTB
*validation* split, its "c4" on 256 random validation windows.

Dev split: the last `dev_fraction` (default 10%) of a calibration source (tokens of the joined
text; documents of C4) is held out. Calibration windows are drawn only from the part before it,
so dev windows (`evaluation_set(..., split="dev")`) never overlap a calibration window, and
they are never test data: design choices are made on them.

Any UTF-8 text file can be evaluated too (`eval.datasets=[path/to/file.txt]`): its whole text
is tokenized in one call and cut into windows exactly as WikiText-2 test is.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

DATASETS = ("wikitext2", "ptb", "c4")

# dataset -> split -> file under the data directory
LOCAL_FILES = {
    "wikitext2": {"validation": "wikitext-2-raw-v1/wiki.valid.raw",
                  "test": "wikitext-2-raw-v1/wiki.test.raw"},
    "ptb": {"validation": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"},
    "c4": {"train": "c4/c4_train_part_of_0.json", "validation": "c4/c4_valid_part_of_0.json"},
}


#: default share of a calibration source held out as its dev split
DEV_FRACTION = 0.1


class DataError(RuntimeError):
    """A data file is missing or unreadable; the message names the directory and the file."""


def is_text_file(dataset: str) -> bool:
    """True when an `eval.datasets` entry names a local text file rather than a known dataset."""
    return dataset not in DATASETS


def dataset_name(dataset: str) -> str:
    """Metric name of an evaluation dataset: the dataset itself, or a text file's stem."""
    return Path(dataset).stem if is_text_file(dataset) else dataset


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content; a missing or undecodable file is one DataError naming it."""
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file {p} not found (eval.datasets takes wikitext2, ptb, c4 or the "
                        f"path of a UTF-8 text file; data files live under paths.data_dir)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"text file {p} is not UTF-8 (byte {e.start}: {e.reason}); "
                        f"convert it, e.g. iconv -t utf-8") from None
    except OSError as e:
        raise DataError(f"cannot read text file {p}: {e.strerror}") from None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """`data_dir` if given, else `$SPIKELLM_DATA_DIR`, else None (use the HF hub)."""
    d = data_dir or os.environ.get("SPIKELLM_DATA_DIR")
    return Path(d).expanduser().resolve() if d else None


def _local_file(dataset: str, split: str, data_dir: Path) -> Path:
    try:
        rel = LOCAL_FILES[dataset][split]
    except KeyError:
        have = ", ".join(f"{d}/{s}" for d in LOCAL_FILES for s in LOCAL_FILES[d])
        raise DataError(f"no local file for {dataset}/{split}; available: {have}") from None
    path = data_dir / rel
    if not path.exists():
        raise DataError(f"missing data file {rel} in data directory {data_dir} "
                        f"(set paths.data_dir or SPIKELLM_DATA_DIR to a directory that has it)")
    return path


def check_available(dataset: str, split: str, data_dir=None) -> None:
    """Raise DataError (one line) if a local data directory is in use and lacks the file
    (or, for a text-file dataset, if the file does not exist)."""
    if is_text_file(dataset):
        if not Path(dataset).expanduser().is_file():
            read_text(dataset)
        return
    root = resolve_data_dir(data_dir)
    if root is not None:
        _local_file(dataset, split, root)


def wikitext_rows(raw: str) -> list[str]:
    """HF `wikitext-2-raw-v1` rows from a `wiki.*.raw` file: line + "\\n", blank (" ") -> ""."""
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return ["" if line.strip() == "" else line + "\n" for line in lines]


def read_c4_documents(path: Path) -> list[str]:
    """Decode the truncated C4 JSON array record by record; stop at the first broken record."""
    text = read_text(path)
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    docs = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        docs.append(obj["text"])
    return docs


def load_rows(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rows of a dataset split as the HF dataset gives them (documents for C4, sentences for PTB)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = _local_file(dataset, split, root)
        if dataset == "wikitext2":
            return wikitext_rows(read_text(path))
        if dataset == "ptb":
            return [line.strip() for line in read_text(path).rstrip("\n").split("\n")]
        return read_c4_documents(path)
    return _load_rows_hub(dataset, split)


def _load_rows_hub(dataset: str, split: str) -> list[str]:
    try:
        from datasets import load_dataset
        if dataset == "wikitext2":
            return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
        if dataset == "ptb":
            return list(load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"])
        shard = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}[split]
        return list(load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"])
    except Exception as e:  # offline, no hub access, ...
        raise DataError(f"cannot load {dataset}/{split} from the HF hub ({type(e).__name__}); "
                        f"set paths.data_dir or SPIKELLM_DATA_DIR to a local data directory") from e


def joined_text(dataset: str, split: str, data_dir=None) -> str:
    """The single text string of the GPTQ protocol: `"\n\n".join(rows)` (WikiText-2 rows,
    PTB sentences)."""
    return "\n\n".join(load_rows(dataset, split, data_dir))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One tokenizer call on the whole text -> LongTensor [1, n_tokens]."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids.long()


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows: ids [1, n] -> [n // seqlen, seqlen]; the remainder is dropped."""
    n = ids.shape[1] // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"text of {ids.shape[1]} tokens is shorter than one window of {seqlen}")
    return ids[0, : n * seqlen].view(n, seqlen)


def calib_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ calibration: `random.seed(seed)`; each window starts at randint(0, n - seqlen - 1).

    ids [1, n] -> [nsamples, seqlen].
    """
    n = ids.shape[1]
    if n <= seqlen + 1:
        raise DataError(f"calibration text of {n} tokens is too short for windows of {seqlen}")
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        i = rng.randint(0, n - seqlen - 1)
        out.append(ids[0, i: i + seqlen])
    return torch.stack(out)


def c4_calib_windows(tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ C4 calibration: a random document longer than seqlen, then a random window in it."""
    rng = random.Random(seed)
    out = []
    long_enough = 0
    for _ in range(100000):
        if len(out) == nsamples:
            break
        doc = docs[rng.randint(0, len(docs) - 1)]
        ids = tokenizer(doc, return_tensors="pt").input_ids
        if ids.shape[1] <= seqlen:
            continue
        long_enough += 1
        i = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[0, i: i + seqlen])
    if len(out) < nsamples:
        raise DataError(f"C4 documents yield only {len(out)} windows of {seqlen} tokens")
    return torch.stack(out)


@dataclass
class CalibSpec:
    """Which text calibrates: `dataset`/`split`, `nsamples` windows of `seqlen` tokens, `seed`.
    The last `dev_fraction` of the split is never sampled: it is the dev split."""
    dataset: str = "wikitext2"
    split: str = "validation"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 2
    dev_fraction: float = DEV_FRACTION


def dev_cut(n: int, dev_fraction: float) -> int:
    """Index where the held-out dev tail of a source of n items (tokens or documents) starts."""
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"calib.dev_fraction={dev_fraction!r} is invalid: must be in [0, 1)")
    return n - int(math.floor(n * dev_fraction))


def calibration_set(tokenizer, spec: CalibSpec, data_dir=None) -> torch.Tensor:
    """[nsamples, seqlen] token ids for calibration, drawn from the split minus its dev tail."""
    if spec.dataset == "c4":
        docs = load_rows("c4", spec.split, data_dir)
        return c4_calib_windows(tokenizer, docs[: dev_cut(len(docs), spec.dev_fraction)],
                                spec.nsamples, spec.seqlen, spec.seed)
    ids = tokenize(tokenizer, joined_text(spec.dataset, spec.split, data_dir))
    return calib_windows(ids[:, : dev_cut(ids.shape[1], spec.dev_fraction)], spec.nsamples,
                         spec.seqlen, spec.seed)


def c4_eval_windows(tokenizer, docs: list[str], seqlen: int, nsamples: int = 256, seed: int = 0) -> torch.Tensor:
    """GPTQ "c4" evaluation: `random.seed(0)`, 256 random documents with > seqlen tokens, one
    random window each. On a partial shard (the local copy) the windows differ from the paper's."""
    return c4_calib_windows(tokenizer, docs, nsamples, seqlen, seed)


#: the split each dataset is evaluated on under the GPTQ/OmniQuant protocol
EVAL_SPLIT = {"wikitext2": "test", "ptb": "validation", "c4": "validation"}
#: evaluation splits: the protocol's test split, or the held-out dev tail of a calibration source
SPLITS = ("test", "dev")


def dev_source(dataset: str, calib: CalibSpec | None = None, data_dir=None) -> str:
    """The split whose held-out tail is `dataset`'s dev split: the calibration split when
    `dataset` is the one calibrated on, else the split calibration would use (train where it
    exists; offline, the local non-test file: WikiText-2/PTB validation, C4 train)."""
    if calib is not None and calib.dataset == dataset:
        split = calib.split
    elif resolve_data_dir(data_dir) is None or "train" in LOCAL_FILES[dataset]:
        split = "train"
    else:
        split = "validation"
    if split == EVAL_SPLIT[dataset]:
        raise DataError(f"{dataset} has no dev split here: its calibration source {dataset}/{split} "
                        f"is also its test split; evaluate it with eval.split=test")
    return split


def source_file(dataset: str, split: str | None = None, data_dir=None,
                calib: CalibSpec | None = None) -> Path | None:
    """The local file an evaluation (`split` None/"test", "dev") or, with `split` a split name,
    a calibration of `dataset` reads; None when the text comes from the HF hub."""
    if is_text_file(dataset):
        return Path(dataset).expanduser()
    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    if split == "dev":
        split = dev_source(dataset, calib, data_dir)
    elif split in (None, "test"):
        split = EVAL_SPLIT[dataset]
    return _local_file(dataset, split, root)


def _c4_windows(max_windows: int | None) -> int:
    """GPTQ's 256 C4 evaluation windows, or fewer for a quick run."""
    return min(256, max_windows) if max_windows else 256


def evaluation_set(tokenizer, dataset: str, seqlen: int, max_windows: int | None = None,
                   split: str | None = None, data_dir=None, calib: CalibSpec | None = None
                   ) -> torch.Tensor:
    """[n_windows, seqlen] token ids of an evaluation split.

    `split`: None or "test" = the protocol's split (`EVAL_SPLIT`), "dev" = the held-out tail of
    the calibration source (`dev_source`; `calib` gives its split and `dev_fraction`), or an
    explicit split name. A text-file `dataset` is windowed whole like WikiText-2 (test only)."""
    if is_text_file(dataset):
        if split == "dev":
            raise DataError(f"eval.split=dev needs a named dataset; the text file {dataset} is "
                            f"evaluated whole with eval.split=test")
        return eval_windows(tokenize(tokenizer, read_text(dataset)), seqlen, max_windows)
    frac = calib.dev_fraction if calib is not None else DEV_FRACTION
    if split == "dev":
        src = dev_source(dataset, calib, data_dir)
        if dataset == "c4":
            docs = load_rows("c4", src, data_dir)
            return c4_eval_windows(tokenizer, docs[dev_cut(len(docs), frac):], seqlen,
                                   _c4_windows(max_windows))
        ids = tokenize(tokenizer, joined_text(dataset, src, data_dir))
        return eval_windows(ids[:, dev_cut(ids.shape[1], frac):], seqlen, max_windows)
    split = None if split == "test" else split
    if dataset == "c4":
        return c4_eval_windows(tokenizer, load_rows("c4", split or "validation", data_dir), seqlen,
                               _c4_windows(max_windows))
    ids = tokenize(tokenizer, joined_text(dataset, split or EVAL_SPLIT[dataset], data_dir))
    return eval_windows(ids, seqlen, max_windows)
