"""The stages of one run as plain functions of (config, upstream results): calibrate ->
quantize -> evaluate. Calibration windows and full-precision perplexities are cached in the
results store by content key, so runs that share them do not recompute them."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from spikellm.data import calibration_set, evaluation_set
from spikellm.evaluate import perplexity
from spikellm.models import LoadedModel, load_model, resolve_source
from spikellm.quantize import QuantReport, fp_saliency_diagonals, quantize

from .store import content_key, load_tensor, read_json, save_tensor, write_json


def say(msg: str) -> None:
    print(f"[spikellm] {msg}", file=sys.stderr, flush=True)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} requested but no CUDA GPU is visible; use device=cpu or auto")
    return device


def load(cfg) -> LoadedModel:
    if cfg.paths.cache:
        os.environ.setdefault("SPIKELLM_CACHE", str(Path(cfg.paths.cache).expanduser()))
    source = resolve_source(cfg.model.path, cfg.model.hub_id, f"model={cfg.model.name}")
    t0 = time.time()
    lm = load_model(source, cfg.model.dtype, resolve_device(cfg.device))
    say(f"loaded {cfg.model.name} from {source} in {time.time() - t0:.1f}s")
    return lm


def cache_dir(cfg) -> Path:
    return Path(cfg.paths.outputs) / "cache"


def calibrate(cfg, lm: LoadedModel) -> torch.Tensor:
    """[nsamples, seqlen] calibration token ids (cached by model tokenizer + calib config)."""
    c = cfg.calib
    key = content_key("calib", cfg.model.name, lm.source, OmegaConf.to_container(c))
    path = cache_dir(cfg) / "calib" / f"{key}.pt"
    ids = load_tensor(path)
    if ids is not None and tuple(ids.shape) == (c.nsamples, c.seqlen):
        return ids
    ids = calibration_set(lm.tokenizer, OmegaConf.to_object(c), cfg.paths.data_dir)
    save_tensor(path, ids)
    return ids


def _eval_key(cfg, lm, dataset):
    e = cfg.eval
    return content_key("ppl", cfg.model.name, lm.source, cfg.model.dtype, dataset, e.seqlen,
                       e.max_windows)


def evaluate_ppl(cfg, lm: LoadedModel, device: str, tag: str) -> dict[str, float]:
    """Perplexity on each of eval.datasets -> {"ppl/<dataset>": value} (tag "fp": "ppl/fp/<d>")."""
    out = {}
    for d in cfg.eval.datasets:
        windows = evaluation_set(lm.tokenizer, d, cfg.eval.seqlen, cfg.eval.max_windows,
                                 data_dir=cfg.paths.data_dir)
        name = f"ppl/fp/{d}" if tag == "fp" else f"ppl/{d}"
        t0 = time.time()
        out[name] = perplexity(lm.model, windows, cfg.eval.batch_size, device,
                               progress=cfg.progress, desc=f"{name} ({windows.shape[0]}x{windows.shape[1]})")
        say(f"{name} = {out[name]:.3f} on {windows.shape[0]} x {windows.shape[1]} tokens "
            f"({time.time() - t0:.0f}s)")
    return out


def fp_perplexity(cfg, lm: LoadedModel, device: str) -> dict[str, float]:
    """Full-precision perplexities, cached per (model, dataset, eval settings)."""
    out, todo = {}, []
    for d in cfg.eval.datasets:
        hit = read_json(cache_dir(cfg) / "fp_ppl" / f"{_eval_key(cfg, lm, d)}.json")
        if hit is not None:
            out[f"ppl/fp/{d}"] = hit["value"]
        else:
            todo.append(d)
    if todo:
        sub = OmegaConf.merge(cfg, {"eval": {"datasets": todo}})
        for name, value in evaluate_ppl(sub, lm, device, "fp").items():
            d = name.split("/")[-1]
            write_json(cache_dir(cfg) / "fp_ppl" / f"{_eval_key(cfg, lm, d)}.json", {"value": value})
            out[name] = value
    return out


def saliency_scores(cfg, lm: LoadedModel, calib_ids: torch.Tensor, device: str) -> dict:
    """Full-precision Hessian diagonals for saliency (cached per model + calibration set)."""
    key = content_key("score", cfg.model.name, lm.source, cfg.model.dtype,
                      OmegaConf.to_container(cfg.calib), cfg.quant.percdamp)
    path = cache_dir(cfg) / "score" / f"{key}.pt"
    hit = load_tensor(path)
    if isinstance(hit, dict):
        return hit
    diags = fp_saliency_diagonals(lm.model, calib_ids, cfg.quant.percdamp, cfg.batch_size,
                                  device, cfg.progress)
    save_tensor(path, diags)
    return diags


def run_quantize(cfg, lm: LoadedModel, calib_ids: torch.Tensor, device: str) -> QuantReport:
    q = OmegaConf.to_object(cfg.quant)
    s = OmegaConf.to_object(cfg.spiking)
    diags = saliency_scores(cfg, lm, calib_ids, device) \
        if s.mode != "none" and s.saliency_from == "fp" else None
    return quantize(lm.model, calib_ids, q, s, batch_size=cfg.batch_size, device=device,
                    progress=cfg.progress, log=say, saliency_diags=diags)
