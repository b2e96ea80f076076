"""Host arithmetic of the MH mixing options (issue 22; ALGORITHM.md "Faster mixing"): the entropy-
guided cut (index="entropy") and multiple-try Metropolis (mh_tries=k). Pure functions of host floats,
so the policy (mh.py, mh_tries.py) stays engine plumbing and the tests can check (or deliberately
break) the rules here.

Entropy cut. Position i of a state x has weight w_i = g(h_i) = eps + h_i ** beta, h_i the entropy of
p(. | x_<i) (it depends on x_<i only). The cut m is drawn with probability w_m / W(x),
W(x) = sum_{lo <= i < t} w_i, from the prefix sums `cum` (cum[i] = sum_{j < i} w_j).

Multiple-try step (k tries, k - 1 reference draws, all continuing x_<m): with
log w(z) = alpha * sum_{i>=m} lp_i(z) - sum_{i>=m} lq_i(z) - log W(z)   (W(z) = t_z - lo for uniform cuts),
select try J with probability w(y_J) / sum_j w(y_j) and accept with
log A = logsumexp_j log w(y_j) - logsumexp(log w(x*_1..x*_{k-1}), log w(x)).
k = 1 is Algorithm 1's rule (plus the entropy cut's log W(x) - log W(x') term).
"""
from __future__ import annotations

import bisect
import math
from typing import List, Sequence


def cut_weight(h: float, eps: float, beta: float) -> float:
    """g(h) = eps + max(h, 0) ** beta (> 0 for eps > 0; a rounding-negative entropy counts as 0)."""
    return eps + (h if h > 0.0 else 0.0) ** beta


def cut_weights(hs: Sequence[float], eps: float, beta: float) -> List[float]:
    """g(h) of every entropy in hs."""
    return [cut_weight(h, eps, beta) for h in hs]


def prefix_sums(weights: Sequence[float], start: float = 0.0) -> List[float]:
    """[start, start + w_0, start + w_0 + w_1, ...] (len(weights) + 1 entries, fp64)."""
    out = [start]
    for w in weights:
        out.append(out[-1] + w)
    return out


def draw_cut(cum: Sequence[float], lo: int, t: int, u: float) -> int:
    """m in [lo, t) with probability (cum[m+1] - cum[m]) / (cum[t] - cum[lo]), from u in [0, 1)."""
    target = cum[lo] + u * (cum[t] - cum[lo])
    m = bisect.bisect_right(cum, target, lo, t + 1) - 1
    return min(max(m, lo), t - 1)


def log_index_weight(W: float) -> float:
    """log W: the cut-choice normaliser of a state (the index term is its difference)."""
    return math.log(W)


def index_term(W_x: float, W_y: float) -> float:
    """log W(x) - log W(x'): the entropy cut's index term of the MH ratio (k = 1)."""
    return log_index_weight(W_x) - log_index_weight(W_y)


def log_weight(alpha: float, sum_lp: float, sum_lq: float, W: float) -> float:
    """log w(z) of a multiple-try candidate: alpha * sum lp - sum lq - log W (suffix sums from the cut)."""
    return alpha * sum_lp - sum_lq - log_index_weight(W)


def logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    if m == float("-inf"):
        return m
    return m + math.log(math.fsum(math.exp(x - m) for x in xs))


def select_try(log_w_tries: Sequence[float], u: float) -> int:
    """Index J with probability w_J / sum w, from u in [0, 1)."""
    m = max(log_w_tries)
    w = [math.exp(x - m) for x in log_w_tries]
    target, acc = u * math.fsum(w), 0.0
    for j, wj in enumerate(w):
        acc += wj
        if target < acc:
            return j
    return len(w) - 1


def mtm_log_accept(log_w_tries: Sequence[float], log_w_refs: Sequence[float], log_w_x: float) -> float:
    """log A of the multiple-try rule: log(sum of the tries' weights) - log(sum of the references'
    weights + w(x)). Every candidate continues the same prefix x_<m, so the cut probabilities
    w_m / W(.) enter each weight through its own 1 / W (w_m itself cancels)."""
    return logsumexp(log_w_tries) - logsumexp(list(log_w_refs) + [log_w_x])
