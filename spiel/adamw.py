"""SparseAdamW: AdamW with per-entry state for sparse deltas (SpIEL-AG, docs/METHOD.md §3.3).

Per-entry ``age`` (bias-correction counter), ``exp_avg`` and ``exp_avg_sq``, all fp32 tensors of shape
``[k]``. Because every entry carries its own age, entries grown by a reselection can be given a fresh
(or seeded, §4.3) state while the rest keep theirs.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .sparse_state import _apply_update, _check_hyper, _closure_loss, _dense_grad, _FP32StateMixin, _Scratch

__all__ = ["SparseAdamW"]


def _log(beta: float) -> float:
    """ln β, with ln 0 = −inf so that exp(age·ln 0) = 0 for every age > 0."""
    return math.log(beta) if beta > 0.0 else float("-inf")


_FP32_SATURATION_BITS = (26, 25)  # β1^a < 2^-26 and β2^a < 2^-25 make the factor round to 1.0 in fp32
_MAX_TABLE_AGE = 1 << 20  # longest lookup table (4 MiB of fp32); older integral ages use the exp path
_LOOKUP_CHUNK_ENTRIES = 1 << 20  # entries updated together by the multi-tensor path (12 MiB of scratch)


def _saturation_age(beta1: float, beta2: float) -> int:
    """The smallest age from which ``sqrt(1 − β2^a) / (1 − β1^a)`` rounds to 1.0 in fp32 for every larger a."""
    age = 1
    for beta, bits in zip((beta1, beta2), _FP32_SATURATION_BITS):
        if beta > 0.0:
            age = max(age, math.ceil(bits * math.log(2.0) / -math.log(beta)) + 1)
    return age


def _bias_correction_table(beta1: float, beta2: float, length: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[length]``: entry a holds ``sqrt(1 − β2^a) / (1 − β1^a)`` computed in fp64 (a = 0 gives NaN,
    0/0, as the formula does)."""
    ages = torch.arange(length, dtype=torch.float64)
    beta1_pow = torch.pow(torch.tensor(beta1, dtype=torch.float64), ages)
    beta2_pow = torch.pow(torch.tensor(beta2, dtype=torch.float64), ages)
    return (torch.sqrt(1.0 - beta2_pow) / (1.0 - beta1_pow)).to(device=device, dtype=torch.float32)


class SparseAdamW(_FP32StateMixin, Optimizer):
    """AdamW with per-entry bias correction and decoupled weight decay (docs/METHOD.md §3.3).

    State per parameter ``p`` of shape ``[k]`` (any shape works; state has the shape of ``p``), all
    fp32: ``age`` (initialised to 1), ``exp_avg`` (0), ``exp_avg_sq`` (0). One step, per entry:

    1. ``m = β1·m + (1−β1)·g``
    2. ``v = β2·v + (1−β2)·g²``
    3. ``denom = (sqrt(v) + eps) · (1 − β1^age) / sqrt(1 − β2^age)``
    4. ``Δ -= lr · m / denom``
    5. ``Δ += −lr·wd·Δ`` (decoupled weight decay, after the Adam step)
    6. ``age += 1``

    Implementation: when every age of a parameter is an integer (always, unless a reselection seeded a
    fractional ``samples / GA``), the factor ``sqrt(1 − β2^age) / (1 − β1^age)`` is read from a small
    table computed once in fp64 (ages past the point where it rounds to 1.0 in fp32 read the last
    entry), and all parameters on a device are updated together with multi-tensor
    (``torch._foreach_*``) and flat operations on reused scratch buffers (in chunks of about 1M
    entries, 12 MiB of scratch): about 12 passes over the entries and a few dispatches per chunk
    instead of ~20 passes and ~20 dispatches per tensor. Other parameters take a per-tensor path computing β^age as ``exp(age·ln β)``. Both agree
    with the formulas above up to fp32 rounding (step 1 is evaluated as ``m + (1−β1)·(g − m)``).
    Write ages only through :meth:`reset_entries`, :meth:`seed_entries` or ``load_state_dict``
    (the optimizer tracks whether they are integral and their maximum).

    Args:
        params: parameters or parameter groups (as for any ``torch.optim.Optimizer``).
        lr: learning rate (default 1e-3, the reference default).
        betas: (β1, β2), each in [0, 1).
        eps: added to sqrt(v) (reference default 1e-6; ``build_optimizer`` defaults to 1e-8 as the
            HF Trainer path of the reference does).
        weight_decay: decoupled weight decay coefficient (pulls Δ toward 0, i.e. toward W0).

    Raises:
        ValueError: a hyper-parameter out of range (named in the message); a sparse gradient;
            ``load_state_dict`` of an SM3 state.
    """

    _KIND = ("SparseAdamW (SpIEL-AG)", frozenset({"age", "exp_avg", "exp_avg_sq"}))

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        _check_hyper(lr, eps, weight_decay)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._scratch = _Scratch()
        self._tables: dict[tuple[float, float, torch.device], tuple[torch.Tensor, int, bool]] = {}
        self._age_info: dict[torch.Tensor, list] = {}  # p -> [all ages integral, max age]

    # -- state helpers -------------------------------------------------------------------------
    def state_for(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state dict of ``p`` (``age``, ``exp_avg``, ``exp_avg_sq``; fp32, shape of ``p``),
        created with age 1 and zero moments if ``p`` has none yet."""
        state = self.state[p]
        if not state:
            state["age"] = torch.ones(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            self._age_info[p] = [True, 1.0]
        return state

    def _ages(self, p: torch.Tensor) -> list:
        """``[all ages integral, max age]`` of ``p``'s state, tracked through this class's own writes and
        recomputed from ``state["age"]`` when unknown (after ``load_state_dict``)."""
        info = self._age_info.get(p)
        if info is None:
            age = self.state_for(p)["age"]
            integral = bool(torch.equal(age, torch.round(age)))
            info = self._age_info[p] = [integral, float(age.max()) if age.numel() else 0.0]
        return info

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102 (as torch.optim.Optimizer)
        super().load_state_dict(state_dict)
        self._age_info.clear()

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"parameter of shape {tuple(p.shape)} is not managed by this optimizer")

    @torch.no_grad()
    def reset_entries(self, p: torch.Tensor, slots: torch.Tensor) -> None:
        """Give the entries ``p[slots]`` a fresh state: age 1, zero moments.

        Args:
            p: a parameter of this optimizer.
            slots: int64 ``[n]`` positions into ``p`` (flat positions for a 1-D ``p``).
        Raises:
            ValueError: ``p`` is not managed by this optimizer.
        """
        self._group_of(p)
        state = self.state_for(p)
        state["age"][slots] = 1.0
        state["exp_avg"][slots] = 0.0
        state["exp_avg_sq"][slots] = 0.0

    @torch.no_grad()
    def seed_entries(
        self,
        p: torch.Tensor,
        slots: torch.Tensor,
        grad_mean: torch.Tensor,
        grad_sq_mean: torch.Tensor,
        age: torch.Tensor | float,
    ) -> None:
        """Seed the state of grown entries from accumulated gradients (docs/METHOD.md §4.3).

        ``exp_avg = grad_mean·(1−β1^age)``, ``exp_avg_sq = grad_sq_mean·(1−β2^age)``, ``age = age``, so
        that this optimizer's per-entry bias correction turns them back into the observed means.

        Args:
            p: a parameter of this optimizer.
            slots: int64 ``[n]`` positions into ``p``.
            grad_mean, grad_sq_mean: fp32 ``[n]`` mean gradient and mean squared gradient per entry.
            age: scalar or fp32 ``[n]``: number of update steps the means cover (samples / GA).
        Raises:
            ValueError: ``p`` is not managed by this optimizer, or the lengths disagree.
        """
        group = self._group_of(p)
        n = slots.numel()
        if grad_mean.numel() != n or grad_sq_mean.numel() != n:
            raise ValueError(
                f"seed_entries: slots has {n} entries but grad_mean has {grad_mean.numel()} "
                f"and grad_sq_mean {grad_sq_mean.numel()}"
            )
        beta1, beta2 = group["betas"]
        state = self.state_for(p)
        age_t = torch.as_tensor(age, dtype=torch.float32, device=p.device).expand(n)
        if n:
            info = self._ages(p)
            info[0] = info[0] and bool(torch.equal(age_t, torch.round(age_t)))
            info[1] = max(info[1], float(age_t.max()))
        state["age"][slots] = age_t
        state["exp_avg"][slots] = grad_mean.float() * (1.0 - torch.pow(beta1, age_t))
        state["exp_avg_sq"][slots] = grad_sq_mean.float() * (1.0 - torch.pow(beta2, age_t))

    # -- update --------------------------------------------------------------------------------
    def _table(self, beta1: float, beta2: float, device: torch.device) -> tuple[torch.Tensor, int, bool]:
        """``(table, last, saturated)``: the bias-correction lookup table of ``(β1, β2)`` on ``device``,
        its last age, and whether the factor is exactly 1.0 in fp32 for every age past ``last``."""
        key = (beta1, beta2, device)
        if key not in self._tables:
            saturation = _saturation_age(beta1, beta2)
            last = min(saturation, _MAX_TABLE_AGE)
            self._tables[key] = (_bias_correction_table(beta1, beta2, last + 1, device), last, last == saturation)
        return self._tables[key]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (documented on the class)
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                _dense_grad(p, "SparseAdamW")
                self.state_for(p)
                _, last, saturated = self._table(beta1, beta2, p.device)
                integral, max_age = self._ages(p)
                if integral and (max_age <= last or saturated):
                    by_device.setdefault(p.device, []).append(p)
                else:
                    self._step_exp(group, p)
            for params in by_device.values():
                chunk: list[torch.Tensor] = []
                size = 0
                for p in params:  # chunks bound the flat scratch buffers (12 bytes per entry)
                    if chunk and size + p.numel() > _LOOKUP_CHUNK_ENTRIES:
                        self._step_lookup(group, chunk)
                        chunk, size = [], 0
                    chunk.append(p)
                    size += p.numel()
                if chunk:
                    self._step_lookup(group, chunk)
            for p in group["params"]:
                if p.grad is not None:
                    self._age_info[p][1] += 1.0
        return loss

    def _step_lookup(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One step for parameters (one device) whose ages are all integral: the bias-correction factor
        ``sqrt(1 − β2^age) / (1 − β1^age)`` comes from a per-(β1, β2) fp64-computed table (ages past the
        fp32 saturation age, where the factor is exactly 1.0, read its last entry), and the arithmetic
        runs as multi-tensor (``torch._foreach_*``) and flat operations over all parameters at once."""
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        device = params[0].device
        table, last, _ = self._table(beta1, beta2, device)
        grads = [p.grad.float().reshape(-1) for p in params]
        states = [self.state[p] for p in params]
        ages = [st["age"].view(-1) for st in states]
        exp_avgs = [st["exp_avg"].view(-1) for st in states]
        exp_avg_sqs = [st["exp_avg_sq"].view(-1) for st in states]
        direct = [p.dtype == torch.float32 and p.is_contiguous() for p in params]
        p32s = [p.view(-1) if d else p.detach().float().reshape(-1) for p, d in zip(params, direct)]
        sizes = [g.numel() for g in grads]
        total = sum(sizes)
        like = grads[0]
        age_index = self._scratch.get("age_index", total, like, torch.int32)
        factor = self._scratch.get("factor", total, like, torch.float32)
        denom = self._scratch.get("denom", total, like, torch.float32)
        age_index_parts = list(age_index.split(sizes))
        factor_parts = list(factor.split(sizes))
        denom_parts = list(denom.split(sizes))

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m = β1·m + (1−β1)·g
        torch._foreach_mul_(exp_avg_sqs, beta2)  # v = β2·v + (1−β2)·g²
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        torch._foreach_copy_(age_index_parts, ages)  # integral ages: exact
        if max(self._age_info[p][1] for p in params) > last:
            age_index.clamp_(max=last)  # the factor is exactly 1.0 from ``last`` on
        torch.index_select(table, 0, age_index, out=factor)
        torch._foreach_mul_(factor_parts, exp_avgs)  # m·sqrt(1−β2^age)/(1−β1^age)
        torch._foreach_copy_(denom_parts, exp_avg_sqs)
        denom.sqrt_().add_(eps)  # sqrt(v) + eps
        torch._foreach_addcdiv_(p32s, factor_parts, denom_parts, value=-lr)  # Δ −= lr·m/denom (§3.3)
        if wd != 0.0:
            torch._foreach_add_(p32s, p32s, alpha=-lr * wd)  # then Δ += −lr·wd·Δ
        torch._foreach_add_(ages, 1.0)
        for p, p32, d in zip(params, p32s, direct):
            if not d:
                p.copy_(p32.view(p.shape))

    def _step_exp(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """One step for one parameter with fractional (or very large) ages: β^age as exp(age·ln β)."""
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        g = p.grad.float().reshape(-1)
        state = self.state[p]
        age, m, v = (state[key].view(-1) for key in ("age", "exp_avg", "exp_avg_sq"))
        n = g.numel()
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        # step = m · sqrt(1 − β2^age) / ((1 − β1^age) · (sqrt(v) + eps)), i.e. m / denom of §3.3
        step = torch.mul(age, _log(beta2), out=self._scratch.get("a", n, g, torch.float32)).exp_()
        step.neg_().add_(1.0).sqrt_()
        bias1 = torch.mul(age, _log(beta1), out=self._scratch.get("b", n, g, torch.float32)).exp_()
        step.div_(bias1.neg_().add_(1.0)).mul_(m)
        step.div_(torch.sqrt(v, out=bias1).add_(eps))
        _apply_update(p, step, lr, wd)
        age.add_(1.0)
