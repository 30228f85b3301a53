"""The top-k kernels of SpIEL's drop and grow: the smallest ``|Δ|`` to drop (§3.1), SpIEL-AG's candidates
(top-k ``|dW|``) and swap decision (§4), and SpIEL-MA's top ``row[i]·col[j]`` over inactive positions (§5.2).

None of them forms a dense int64/bool tensor of a matrix: the AG candidates are the exact top-k
``|dW|`` (:func:`topk_abs_indices`), found through a threshold estimated on a fixed pseudo-random sample
of the matrix instead of a full ``torch.topk`` (only ties at the k-th magnitude may resolve
differently); the MA growth (:func:`top_inactive_scores`) finds its threshold by a search over the
sorted accumulators and enumerates only the positions above it, with a fallback that scores row blocks
of at most ``block_elements`` (the §5.2 caveat of docs/METHOD.md).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

__all__ = ["isin_distinct", "drop_slots", "choose_ag_growth", "top_inactive_scores", "topk_abs_indices"]


def isin_distinct(values: torch.Tensor, distinct_set: torch.Tensor) -> torch.Tensor:
    """Membership of each of ``values`` in ``distinct_set``: bool, shape of ``values``. Both inputs hold
    distinct elements (index sets, candidate sets), which lets ``torch.isin`` skip its deduplication;
    no dense temporary of the matrix size."""
    return torch.isin(values, distinct_set, assume_unique=True)


def drop_slots(values: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` slots of ``values`` ``[k]`` with the smallest ``|Δ|``, ascending by ``|Δ|`` (§3.1).

    Returns int64 ``[n]``. Raises ValueError if ``n`` is not in ``[0, k]``.
    """
    k = values.numel()
    if not 0 <= n <= k:
        raise ValueError(f"drop: n must be in [0, {k}], got {n}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=values.device)
    return torch.topk(values.detach().abs().float(), n, largest=False, sorted=True).indices


def choose_ag_growth(indices: torch.Tensor, outgoing: torch.Tensor, candidates: torch.Tensor,
                     scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SpIEL-AG's swap decision for one matrix (docs/METHOD.md §4.2, steps 2–5).

    Args:
        indices: current η ``[k]`` (int32/int64).
        outgoing: int64 ``[n]`` slots to drop, ordered by ascending ``|Δ|`` (from :func:`drop_slots`).
        candidates: ``[c]`` distinct flat positions (int32/int64).
        scores: ``[c]`` growth scores (``|Σ dW|``), higher is better.
    Returns:
        ``(slots, chosen)``: int64 ``[m]`` slots to overwrite and int64 ``[m]`` positions into
        ``candidates`` giving their new indices. Candidates already in the kept set are discarded;
        positions both outgoing and incoming keep their slot; the outgoing list (smallest ``|Δ|``
        first) is truncated to the number of incoming.
    """
    active = indices.long()
    cand = candidates.long()
    n = outgoing.numel()
    if n == 0 or cand.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64, device=indices.device)
        return empty, empty
    keep = torch.ones(active.numel(), dtype=torch.bool, device=active.device)
    keep[outgoing] = False
    valid = (~isin_distinct(cand, active[keep])).nonzero().squeeze(1)
    m = min(n, valid.numel())
    chosen = valid[torch.topk(scores[valid].float(), m, sorted=True).indices]
    incoming = cand[chosen]
    out_positions = active[outgoing]
    slots = outgoing[~isin_distinct(out_positions, incoming)]
    chosen = chosen[~isin_distinct(incoming, out_positions)]
    return slots[: chosen.numel()], chosen


def top_inactive_scores(row: torch.Tensor, col: torch.Tensor, active: torch.Tensor, n: int,
                        block_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` highest ``row[i]·col[j]`` scores over positions NOT in ``active`` (SpIEL-MA, §5.2).

    Scores are the fp32 products ``row[i] * col[j]`` (as ``torch.outer`` gives them). For non-negative
    finite accumulators (SM3's always are) the top-n is found without scoring every position: with the
    columns sorted, the positions scoring at least ``t`` form a prefix of the sorted columns in every
    row, so their number is one ``searchsorted`` per row. A bisection on ``t`` (the active positions'
    scores subtracted) finds a threshold leaving at least ``n`` inactive positions, only those are
    enumerated and scored, and the exact top-n is taken among them: O(out·log(in)) per bisection step
    plus O(n + k), instead of O(out·in) (README, Performance). Otherwise (negative or non-finite
    scores, fewer positive-score inactive positions than ``n``, or heavy ties at the threshold) it scores
    blocks of whole rows (at most ``block_elements`` fp32 scores at a time, default 4 Mi = 16 MiB),
    masking active positions and keeping a running top-n: memory O(block + n + k), never O(out·in).
    Both give the same positions; ties at the n-th score go to the lower flat position.

    Args:
        row: fp32 ``[out]``; col: fp32 ``[in]``; active: ``[k]`` flat positions (any integer dtype).
        n: how many to return (fewer if fewer positions are inactive).
    Returns:
        ``(positions, scores)``: int64 ``[m]`` flat positions, fp32 ``[m]``, descending score (ties:
        ascending position), m ≤ n.
    """
    device = row.device
    if n <= 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device)
    active_sorted = torch.sort(active.reshape(-1).long()).values
    fast = _top_inactive_by_threshold(row.float(), col.float(), active_sorted, n)
    if fast is not None:
        return fast
    return _top_inactive_blockwise(row.float(), col.float(), active_sorted, n, block_elements)


def _top_n_ordered(pos: torch.Tensor, scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` best of (positions, scores): descending score, ties by ascending position."""
    by_pos = torch.argsort(pos)
    pos, scores = pos[by_pos], scores[by_pos]
    order = torch.argsort(scores, descending=True, stable=True)[:n]
    return pos[order], scores[order]


_FP32_MAX = float(torch.finfo(torch.float32).max)
_FP32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal: below it relative rounding error grows


def _top_inactive_by_threshold(row32: torch.Tensor, col32: torch.Tensor, active_sorted: torch.Tensor,
                               n: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The threshold path of :func:`top_inactive_scores`; None where it does not apply."""
    out_f, in_f = row32.numel(), col32.numel()
    if not (bool(torch.isfinite(row32).all()) and bool(torch.isfinite(col32).all())
            and float(row32.min()) >= 0.0 and float(col32.min()) >= 0.0):
        return None
    if n >= out_f * in_f - active_sorted.numel():
        return None  # every inactive position is wanted: the blockwise path lists them
    r64, c64 = row32.double(), col32.double()
    c_asc, c_order = torch.sort(c64)
    c_desc_cols = c_order.flip(0)  # columns by descending accumulator: every row's positions >= t are a prefix
    positive = r64 > 0
    r_positive = r64[positive]
    act_rows = torch.div(active_sorted, in_f, rounding_mode="floor")
    act_exact = r64[act_rows] * c64[active_sorted - act_rows * in_f]  # exact in fp64 (24-bit mantissas)

    def counts(t: float) -> tuple[torch.Tensor, int]:
        """Per-row count of positions with exact score >= t (t > 0), and the active ones among them."""
        need = torch.full_like(r64, float("inf"))
        need[positive] = t / r_positive
        per_row = in_f - torch.searchsorted(c_asc, need, side="left")
        return per_row, int((act_exact >= t).sum())

    hi = float(r64.max()) * float(c64.max())
    if not hi < _FP32_MAX:
        return None  # fp32 scores overflow to inf: ties the exact products would break differently
    positive_scores = positive.sum() * (c64 > 0).sum()
    if hi <= 0.0 or int(positive_scores) - int((act_exact > 0).sum()) < n:
        return None  # zeros would have to fill the top-n: ties everywhere, use the blockwise path
    lo = hi
    while True:  # geometric search down to a threshold that leaves >= n inactive positions
        lo *= 0.5
        per_row, active_above = counts(lo)
        if int(per_row.sum()) - active_above >= n:
            break
        if lo < 1e-300:
            return None
    slack = max(n // 16, 256)
    for _ in range(64):  # bisect between lo (enough) and hi (not enough) until little is wasted
        if int(per_row.sum()) - active_above <= n + slack:
            break
        mid = 0.5 * (lo + hi)
        mid_rows, mid_active = counts(mid)
        if int(mid_rows.sum()) - mid_active >= n:
            lo, per_row, active_above = mid, mid_rows, mid_active
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    # Enumerate at a slightly lower threshold so that fp32 rounding of the scores cannot drop a position
    # tied with, or just above, the n-th inactive score.
    if lo * (1.0 - 1e-6) < _FP32_TINY:
        return None  # fp32 scores near the threshold are subnormal or zero: rounding creates ties
    per_row, _ = counts(lo * (1.0 - 1e-6))
    total = int(per_row.sum())
    if total > 4 * (n + active_sorted.numel()) + (1 << 20):
        return None  # heavy ties at the threshold: enumeration would not save work
    rows = torch.repeat_interleave(torch.arange(out_f, device=r64.device), per_row)
    starts = torch.repeat_interleave(torch.cumsum(per_row, 0) - per_row, per_row)
    cols = c_desc_cols[torch.arange(total, device=r64.device) - starts]
    pos = rows * in_f + cols
    slot = torch.searchsorted(active_sorted, pos).clamp_(max=max(active_sorted.numel() - 1, 0))
    keep = active_sorted[slot] != pos if active_sorted.numel() else torch.ones_like(pos, dtype=torch.bool)
    pos, rows, cols = pos[keep], rows[keep], cols[keep]
    scores = row32[rows] * col32[cols]
    return _top_n_ordered(pos, scores, n)


def _top_inactive_blockwise(row32: torch.Tensor, col32: torch.Tensor, active_sorted: torch.Tensor, n: int,
                            block_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blockwise path of :func:`top_inactive_scores` (scores every position, a block of rows at a time)."""
    out_f, in_f = row32.numel(), col32.numel()
    device = row32.device
    rows_per_block = max(1, block_elements // max(1, in_f))
    best_scores = torch.empty(0, dtype=torch.float32, device=device)
    best_pos = torch.empty(0, dtype=torch.int64, device=device)
    for r0 in range(0, out_f, rows_per_block):
        r1 = min(out_f, r0 + rows_per_block)
        block = torch.outer(row32[r0:r1], col32).view(-1)
        block.masked_fill_(block.isnan(), float("-inf"))  # a NaN score ranks last, not hiding the block
        base = r0 * in_f
        bounds = torch.searchsorted(active_sorted, torch.tensor([base, r1 * in_f], device=device))
        lo, hi = int(bounds[0]), int(bounds[1])
        if hi > lo:
            block[active_sorted[lo:hi] - base] = float("-inf")
        m = min(n, block.numel())
        cut = torch.topk(block, m, sorted=False).values.min()
        above = (block > cut).nonzero().squeeze(1)
        tied = (block == cut).nonzero().squeeze(1)[: m - above.numel()]  # ascending: lowest positions
        local = torch.cat([above, tied])
        vals, pos = block[local], local + base
        if best_scores.numel():  # earlier blocks hold lower positions: _top_n_ordered prefers them on ties
            vals = torch.cat([best_scores, vals])
            pos = torch.cat([best_pos, pos])
        best_pos, best_scores = _top_n_ordered(pos, vals, n)
        del block
    finite = best_scores > float("-inf")
    return _top_n_ordered(best_pos[finite], best_scores[finite], n)


_SAMPLE_SIZE = 1 << 14  # magnitudes sampled to estimate the top-k threshold
_SAMPLE_MIN_NUMEL = 1 << 16  # below this, or when k > numel / 4, a plain torch.topk is as fast


@functools.lru_cache(maxsize=64)
def _sample_positions(numel: int, device: str) -> torch.Tensor:
    """``_SAMPLE_SIZE`` pseudo-random flat positions in ``[0, numel)`` (int64, sorted, on ``device``),
    identical in every process (fixed seed): the threshold estimate, and so the candidate set, never
    depends on the rank."""
    gen = torch.Generator().manual_seed(numel)
    pos = torch.randint(0, numel, (_SAMPLE_SIZE,), generator=gen).sort().values
    return pos.to(device)


def topk_abs_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions of the ``k`` largest ``|values|`` (unordered), as ``torch.topk(values.abs(), k)``
    gives them (docs/METHOD.md §4.1, the SpIEL-AG candidate set), without a full top-k of the matrix.

    The k-th magnitude is bracketed from below by a generous quantile of a fixed pseudo-random sample of
    ``_SAMPLE_SIZE`` magnitudes; the exact top-k is then taken among the positions at or above that
    threshold (typically ~1.3·k of them; NaNs always pass and rank highest, as in ``torch.topk``). If
    fewer than ``k`` positions pass (an unlucky sample), it falls back to ``torch.topk`` over all of
    them, so the result is always the exact top-k set; only which of several entries tied at the k-th
    magnitude are taken may differ. Temporaries: one magnitude tensor and one bool mask of ``values``'
    size. A full ``torch.topk(values.abs(), k)`` sorts far more than the ~1.3·k survivors (README,
    Performance).

    Args:
        values: any shape, floating (the dense ``dW`` of one matrix, fp32).
        k: ``0 <= k <= values.numel()``.
    Returns:
        int64 ``[k]`` flat positions.
    Raises:
        ValueError: ``k`` out of range.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"topk_abs_indices: k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    magnitudes = flat.abs()
    if n < _SAMPLE_MIN_NUMEL or 4 * k > n:
        return torch.topk(magnitudes, k, sorted=False).indices
    sample = magnitudes.index_select(0, _sample_positions(n, str(flat.device)))
    expected = k * sample.numel() / n  # sampled magnitudes expected above the k-th largest
    quantile = min(sample.numel(), int(1.25 * expected + 6.0 * math.sqrt(expected) + 16))
    threshold = torch.topk(sample, quantile, sorted=False).values.min()
    above = torch.lt(magnitudes, threshold).logical_not_().nonzero().squeeze(1)  # NaNs stay in, as in topk
    if above.numel() < k:
        return torch.topk(magnitudes, k, sorted=False).indices
    return above.index_select(0, torch.topk(magnitudes.index_select(0, above), k, sorted=False).indices)

