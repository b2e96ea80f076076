"""Answer grading for `powersample-fast run --grade math`, with HF's `math-verify` (the parser and
equivalence checker of HF's evaluation stack: lighteval, open-r1). Needs the `grade` extra.

The model's final answer is extracted from its text (a `\\boxed{}` first, then LaTeX or plain
expressions), the reference answer is parsed the same way (a bare answer such as `\\frac{1}{2}` or
`1/2` is read as LaTeX math), and the two are compared symbolically: `0.5`, `1/2`, `\\frac{2}{4}` and
`50\\%` all match `\\frac{1}{2}`.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ...errors import ConfigError

GRADERS = ("math",)


def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ConfigError("--grade math needs math-verify: pip install 'powersample-fast[grade]'") from e
    return math_verify


def _gold_text(answer) -> str:
    s = str(answer).strip()
    return s if ("$" in s or "\\boxed" in s) else f"${s}$"


def grade_math(text: str, answer) -> Tuple[Optional[str], bool]:
    """(the answer extracted from `text` or None, whether it equals `answer`). math-verify's timeouts
    use SIGALRM, so call this from the main thread."""
    mv = _math_verify()
    gold = mv.parse(_gold_text(answer))
    pred = mv.parse(text or "")
    extracted = str(pred[-1]) if pred else None
    return extracted, bool(gold and pred and mv.verify(gold, pred))


def check_grader(name: Optional[str]):
    """Fail early (before loading a model) on an unknown grader or a missing dependency."""
    if name is None:
        return
    if name not in GRADERS:
        raise ConfigError(f"unknown grader {name!r}; choose one of {', '.join(GRADERS)}")
    _math_verify()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    p = 1.0
    for i in range(n - c + 1, n + 1):
        p *= 1.0 - k / i
    return 1.0 - p
