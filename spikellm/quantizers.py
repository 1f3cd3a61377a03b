"""Per-column weight quantizers driven by the GPTQ solver.

Every quantizer sees the weight matrix W [C_out, C_in] one input column at a time (in the
solver's column order) and returns the quantized column. Parameters that span several
columns (a row scale, a group scale, a PB-LLM element mask) are fitted by `fit` at the
first column of their span, from the solver's current, error-updated weights.
"""
from __future__ import annotations

import math

import torch

from .allocation import mask_bits
from .gif import ternary_codes, ternary_quant
from .saliency import hessian_element_saliency


def _shrink_grid(n: int = 80, lo: float = 0.02) -> torch.Tensor:
    """Geometric grid of shrink factors in (lo, 1], finest near 1."""
    return torch.logspace(math.log10(lo), 0.0, n)


class ColumnQuantizer:
    """Interface. `span` = columns covered by one `fit` (0 = all columns)."""
    span: int = 0

    def prepare(self, W: torch.Tensor, U: torch.Tensor) -> None:
        """Called once with the (permuted) weights and U = chol(H⁻¹) before the column loop."""

    def fit(self, j: int, cols: torch.Tensor) -> None:
        """Fit parameters for columns j .. j+cols.shape[1]-1 from their current values."""

    def quantize(self, j: int, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def needs_fit(self, j: int) -> bool:
        return j == 0 if self.span <= 0 else j % self.span == 0

    def groups(self, c_in: int) -> int:
        """Parameter groups per output row: 1 per row, or one per `span` columns."""
        return 1 if self.span <= 0 else -(-c_in // self.span)

    def code_classes(self) -> tuple[list, torch.Tensor | None, bool]:
        """After the solve: (the layer's `packing.CodeClass`es with their fitted parameters
        [C_out, G], the class of each weight [C_out, C_in] or column [C_in] in solver column
        order (None: one class), per_column) for `packing.pack_layer`."""
        raise NotImplementedError  # pragma: no cover - interface

    def storage(self, c_out: int, c_in: int) -> dict:
        """What the quantized layer stores and multiplies, after the solve: {"code_bits": total
        bits of the codes, "fp16_params": scales/zeros/thresholds, "mask_bits": salient masks,
        "scale_mults": FP16 multiplies per output row and token}."""
        raise NotImplementedError  # pragma: no cover - interface


class UniformQuantizer(ColumnQuantizer):
    """RTN/GPTQ grid: `bits`-bit uniform, per output row (group_size 0) or per row and group of
    `group_size` columns, symmetric or asymmetric min-max, optional MSE shrink search
    (GPTQ's `mse=True`: grid 100, maxshrink 0.8, norm 2.4)."""

    def __init__(self, bits: int, group_size: int = 0, sym: bool = False, mse: bool = False):
        self.bits, self.sym, self.mse = bits, sym, mse
        self.span = group_size if group_size and group_size > 0 else 0
        self.maxq = 2 ** bits - 1
        self.fitted: list[tuple[torch.Tensor, torch.Tensor]] = []   # (scale, zero) per fit

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, n] -> scale, zero [R, 1] (GPTQ's find_params, per channel)."""
        zeros = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        xmin = torch.minimum(x.min(1).values, zeros)
        xmax = torch.maximum(x.max(1).values, zeros)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both0 = (xmin == 0) & (xmax == 0)
        xmin[both0], xmax[both0] = -1.0, 1.0
        scale, zero = self._scale_zero(xmin, xmax)
        if self.mse:
            best = torch.full_like(xmin, float("inf"))
            for i in range(int(0.8 * 100)):
                p = 1 - i / 100
                s1, z1 = self._scale_zero(p * xmin, p * xmax)
                q = self._dq(x, s1.unsqueeze(1), z1.unsqueeze(1))
                err = ((q - x).abs() ** 2.4).sum(1)
                better = err < best
                best[better], scale[better], zero[better] = err[better], s1[better], z1[better]
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def _scale_zero(self, xmin, xmax):
        scale = (xmax - xmin) / self.maxq
        zero = torch.full_like(scale, (self.maxq + 1) / 2) if self.sym else torch.round(-xmin / scale)
        return scale, zero

    def _dq(self, x, scale, zero):
        q = torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)
        return scale * (q - zero)

    def fit(self, j, cols):
        self.scale, self.zero = self._params(cols)
        self.fitted.append((self.scale[:, 0], self.zero[:, 0]))   # on the device: no sync per group

    def quantize(self, j, w):
        return self._dq(w, self.scale[:, 0], self.zero[:, 0])

    def code_class(self):
        from .packing import CodeClass
        s = torch.stack([f[0] for f in self.fitted], 1).cpu()
        if self.sym:                      # GPTQ's symmetric zero point is one constant, (maxq + 1) / 2
            return CodeClass(self.maxq + 1, "uniform", {"s": s}, consts={"z": (self.maxq + 1) / 2})
        return CodeClass(self.maxq + 1, "uniform", {"s": s, "z": torch.stack([f[1] for f in self.fitted], 1).cpu()})

    def code_classes(self):
        return [self.code_class()], None, False

    def storage(self, c_out, c_in):
        g = self.groups(c_in)
        # a row/group stores its scale (and zero when asymmetric); its partial sum is scaled and
        # zero-corrected: two multiplies
        return {"code_bits": float(c_out * c_in * self.bits),
                "fp16_params": float(c_out * g * (1 if self.sym else 2)), "mask_bits": 0.0,
                "scale_mults": float(2 * g)}


class TernaryGIFQuantizer(ColumnQuantizer):
    """SpikeLLM ternary spiking weights: weight (i, j) is a T_ij-step bi-directional GIF, i.e.
    the symmetric (2T+1)-level grid alpha * {-T..T}.

    steps: int [C_in] GIF steps per column (column saliency) or [C_out, C_in] per weight
    (element saliency), in solver column order. Thresholds alpha are per output row and per
    group of `group_size` columns (0: one per row), one for the normal (T=1) weights and one
    for the salient ones. `salient_scale`:
      - "shared": salient weights fire up to T times at the normal weights' threshold
        (wider range, same step);
      - "own": salient weights get their own threshold, chosen by MSE for their T (the search
        decides between finer steps and wider range).
    Each threshold minimises Σ (w - alpha*clip(round(w/alpha), -T, T))² over its weights,
    optionally weighted by the OBS column importance 1/U_jj² (`weighted`).
    """

    def __init__(self, steps: torch.Tensor, group_size: int = 0, salient_scale: str = "own",
                 weighted: bool = False):
        self.steps = steps.long()
        self.per_column = steps.dim() == 1
        self.span = group_size if group_size and group_size > 0 else 0
        if salient_scale not in ("shared", "own"):
            raise ValueError("salient_scale must be 'shared' or 'own'")
        self.salient_scale = salient_scale
        self.weighted = weighted
        self.importance = None
        self.fitted: list[tuple[torch.Tensor, torch.Tensor]] = []   # (normal, salient alpha) per fit

    def permute(self, perm: torch.Tensor) -> None:
        self.steps = self.steps[..., perm.cpu()]

    def prepare(self, W, U):
        if self.steps.dim() == 1:
            self.steps = self.steps.unsqueeze(0).expand(W.shape[0], -1)
        self.steps = self.steps.to(W.device)
        if self.weighted:
            self.importance = (1.0 / torch.diag(U).float() ** 2).unsqueeze(0)

    @staticmethod
    def _search(x: torch.Tensor, T: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x, T, weight [R, n] -> alpha [R] minimising Σ weight * (x - q(x))² per row
        (weight 0 excludes an element)."""
        tmax = (T * (weight > 0)).amax(1).clamp_min(1).to(x.dtype)
        amax = (x.abs() * (weight > 0)).amax(1).clamp_min(1e-12)
        Tf = T.to(x.dtype)
        best_err = torch.full_like(amax, float("inf"))
        best = amax / tmax
        for p in _shrink_grid().to(x.device, x.dtype):
            alpha = (p * amax / tmax).unsqueeze(1)
            err = ((x - ternary_quant(x, alpha, Tf)) ** 2 * weight).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, alpha[:, 0], best)
        return best

    def fit(self, j, cols):
        n = cols.shape[1]
        T = self.steps[:, j: j + n]
        imp = torch.ones_like(cols) if self.importance is None else \
            self.importance[:, j: j + n].expand_as(cols).to(cols.dtype)
        salient = T > 1
        a_norm = self._search(cols, torch.ones_like(T), imp * (~salient))
        self.alpha = a_norm.unsqueeze(1).expand(-1, n).clone()
        a_sal = a_norm
        if salient.any():
            if self.salient_scale == "own":
                a_sal = self._search(cols, T, imp * salient)
                self.alpha = torch.where(salient, a_sal.unsqueeze(1), self.alpha)
        self.fitted.append((a_norm, a_sal))
        self.j0 = j

    def quantize(self, j, w):
        codes = ternary_codes(w, self.alpha[:, j - self.j0], self.steps[:, j].to(w.dtype))
        # a code c fires |c| ternary spikes (gif.ternary_spike_train): the static weight spikes
        # (a device tensor: no host sync per column)
        self.fired = getattr(self, "fired", 0.0) + codes.abs().sum()
        return self.alpha[:, j - self.j0] * codes

    def weight_spikes(self) -> tuple[float, float]:
        """(fired ternary weight spikes, spike slots = Σ steps) of the solved layer: static, the
        same for every token (`spikes.SpikeAccounting`)."""
        return float(getattr(self, "fired", 0.0)), float(self.steps.sum())

    def code_classes(self):
        from .packing import CodeClass
        steps = self.steps.cpu()
        sal = sorted(set(steps.unique().tolist()) - {1})
        if len(sal) > 1 or bool((steps < 1).any()):
            raise ValueError(f"packing needs one salient step count; this layer has steps {sal}")
        a_norm = torch.stack([f[0] for f in self.fitted], 1).cpu()
        classes = [CodeClass(3, "sym", {"alpha": a_norm})]
        if sal and self.salient_scale == "own":
            classes.append(CodeClass(2 * sal[0] + 1, "sym", {"alpha": torch.stack([f[1] for f in self.fitted], 1).cpu()}))
        elif sal:                                       # the normal weights' threshold, stored once
            classes.append(CodeClass(2 * sal[0] + 1, "sym", shares=0))
        cls = (steps > 1).long()
        return classes, (cls[0] if self.per_column else cls), self.per_column

    def thresholds(self) -> int:
        """Thresholds per row and group: the normal weights' and, with salient_scale=own and any
        salient weight, the salient weights' own."""
        return 2 if self.salient_scale == "own" and bool((self.steps > 1).any()) else 1

    def storage(self, c_out, c_in):
        steps = self.steps.expand(c_out, c_in)          # [C_out, C_in] after prepare
        code_bits = float(torch.log2(2.0 * steps.double() + 1).sum())   # a T-step code: 2T+1 levels
        salient = steps > 1
        masks = mask_bits(c_in, int(salient[0].sum())) if self.per_column else \
            mask_bits(c_out * c_in, int(salient.sum()))
        n = self.groups(c_in) * self.thresholds()
        return {"code_bits": code_bits, "fp16_params": float(c_out * n), "mask_bits": masks,
                "scale_mults": float(n)}


class PBLLMQuantizer(ColumnQuantizer):
    """PB-LLM: a `salient_frac` fraction of weights (per element, Hessian metric W²/U_jj² over
    the whole matrix) kept at `high_bits` (asymmetric min-max), the rest binarized around the
    mean of the non-salient weights: mean + a*sign(w - mean), a = mean|w - mean|.

    group_size 0: one binarization (mean, a) and one high-bit grid per row, fitted once on the
    original weights (as PB-LLM does); group_size g: one of each per row and group of g columns,
    fitted at the group's first column from the solver's current weights (as GPTQ fits groups).
    A group spanning the whole row is the per-row quantizer."""

    def __init__(self, salient_frac: float = 0.05, high_bits: int = 8, group_size: int = 0):
        self.salient_frac, self.high = salient_frac, UniformQuantizer(high_bits)
        self.span = group_size if group_size and group_size > 0 else 0
        self.fitted: list[tuple[torch.Tensor, torch.Tensor]] = []   # (mean, a) per fit

    def prepare(self, W, U):
        self.fitted, self.high.fitted = [], []          # a second prepare (the solve's) starts over
        sal = hessian_element_saliency(W, U)
        k = int(round(self.salient_frac * sal.numel()))
        self.mask = torch.zeros_like(W, dtype=torch.bool)
        if k > 0:
            thr = torch.topk(sal.flatten(), k).values[-1]
            self.mask = sal >= thr
        if self.span <= 0:
            self._fit_binary(0, W)

    def _fit_binary(self, j: int, cols: torch.Tensor) -> None:
        """Binarization and high-bit grids of columns j.. j+n-1 from cols [C_out, n]."""
        low = ~self.mask[:, j: j + cols.shape[1]]
        cnt = low.sum(1).clamp_min(1)
        self.mean = (cols * low).sum(1) / cnt
        self.a = ((cols - self.mean[:, None]).abs() * low).sum(1) / cnt
        self.fitted.append((self.mean, self.a))
        self.high.fit(j, cols)

    def fit(self, j, cols):
        if self.span > 0:
            self._fit_binary(j, cols)

    def quantize(self, j, w):
        binar = self.mean + self.a * torch.sign(w - self.mean)
        return torch.where(self.mask[:, j], self.high.quantize(j, w), binar)

    def code_classes(self):
        from .packing import CodeClass
        binar = CodeClass(2, "binary", {"m": torch.stack([f[0] for f in self.fitted], 1).cpu(),
                                        "a": torch.stack([f[1] for f in self.fitted], 1).cpu()})
        return [binar, self.high.code_class()], self.mask.long().cpu(), False

    def storage(self, c_out, c_in):
        k = int(self.mask.sum())
        n = self.groups(c_in) * 4      # per row/group: mean, a (binarized), scale, zero (high bits)
        return {"code_bits": float(k * self.high.bits + (c_out * c_in - k)),
                "fp16_params": float(c_out * n), "mask_bits": mask_bits(c_out * c_in, k),
                "scale_mults": float(n)}
