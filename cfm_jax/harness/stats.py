"""Seed statistics for result tables: per-cell summaries and paired comparisons between cells.

Every table cell runs with seeds 0..n-1, and seed k of every cell shares its data order (batches are
a pure function of (seed, step)) and its initialisation seed, so two cells are compared on their
per-seed *differences* (a paired design). Everything here is a pure function of lists of floats:

    summarize([0.51, 0.53, 0.99], solved_at=0.9)
        -> {"n": 3, "mean": 0.677, "ci": (-0.01, 1.37), "median": 0.53, "solved": 1, "values": [...]}
    compare([...a per seed...], [...b per seed...], expect="greater", bimodal=False)
        -> {"diff": ..., "ci": ..., "p": ..., "test": "paired t", ...}
    holm([p1, p2, ...]) -> adjusted p-values (Holm-Bonferroni step-down)

Tests: a paired two-sided t test on the differences by default. Where outcomes are bimodal (an
accuracy column in which some seeds solve the task and others do not, so the differences are far
from normal), the exact sign-flip permutation test on the differences (all 2^n sign patterns) instead;
its smallest attainable two-sided p-value is 2 / 2^n (0.25 at n = 3, 0.0625 at n = 5), which the
comparisons table states, so a reader sees when n is too small for that test to ever pass.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95  # confidence level of every interval
ALPHA = 0.05  # family-wise error rate of one table's comparisons (after Holm)
EXPECTATIONS = ("greater", "less")  # the declared direction: mean of a minus b expected > 0 / < 0


@dataclass(frozen=True)
class Comparison:
    """One difference a table's reading relies on: cell `a` against cell `b` on `column` (b's value
    read from `column_b` when given: e.g. one cell's accuracy near vs far, with a == b).

    expect: "greater" if the literature expects a's value above b's, "less" if below.
    claim:  the sentence being tested, e.g. "attention recalls better than a sliding window (Based)".
    margin: b's values are scaled by (1 + margin) before pairing, so expect="less", margin=0.01 tests
            "a is below 1.01 x b": a's loss within 1 % of b's (a non-inferiority test; ProSparse's
            "within 1 % of the dense loss").
    """

    a: str
    b: str
    column: str
    expect: str
    claim: str = ""
    column_b: str | None = None
    margin: float = 0.0

    @property
    def b_label(self) -> str:
        """'b', or '1.01 x b' with a margin."""
        return self.b if not self.margin else f"{1 + self.margin:g} x {self.b}"

    @property
    def columns(self) -> tuple[str, str]:
        return self.column, self.column_b or self.column

    @property
    def label(self) -> str:
        """'col' or 'col_a vs col_b'."""
        return self.column if self.column_b in (None, self.column) else f"{self.column} vs {self.column_b}"

    def __post_init__(self):
        if self.expect not in EXPECTATIONS:
            raise ValueError(f"Comparison expect={self.expect!r}; allowed: {', '.join(EXPECTATIONS)}")
        if not (math.isfinite(self.margin) and self.margin > -1):
            raise ValueError(f"Comparison margin={self.margin!r}; allowed: a finite number > -1 (0 = none)")


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval for the mean; (nan, nan) for fewer than 2 values, (m, m) with no spread."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    mean = float(np.mean(values))
    sem = float(np.std(values, ddof=1)) / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sem
    return (mean - half, mean + half)


def summarize(values: list[float], solved_at: float | None = None) -> dict:
    """n, mean, std, 95 % t interval, median, per-seed values; with `solved_at`, how many values
    reach it ("k of n seeds solved")."""
    v = [float(x) for x in values]
    out = {"n": len(v), "values": v}
    if not v:
        return out
    out["mean"] = float(np.mean(v))
    out["std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    out["ci"] = t_interval(v)
    out["median"] = float(np.median(v))
    if solved_at is not None:
        out["solved"] = sum(x >= solved_at for x in v)
    return out


def is_bimodal(values: list[float], solved_at: float | None) -> bool:
    """Some seeds reach `solved_at` and some do not: a mean of them describes no run that happened."""
    if solved_at is None:
        return False
    solved = [x >= solved_at for x in values]
    return any(solved) and not all(solved)


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of mean(diffs) = 0: the share of the 2^n sign
    patterns whose |mean| reaches the observed one (the observed pattern included)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0 or not np.all(np.isfinite(d)):
        return math.nan
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, np.abs(d).max())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed - tol))


def paired_t_p(diffs: list[float]) -> float:
    """Two-sided paired t-test p-value of mean(diffs) = 0. All-equal differences: 1.0 when they are
    all zero, else 0.0 (a constant nonzero difference; the t statistic is infinite)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or not np.all(np.isfinite(d)):
        return math.nan
    if np.allclose(d, d[0], rtol=0, atol=1e-12 * max(1.0, np.abs(d).max())):
        return 1.0 if abs(d[0]) <= 1e-12 else 0.0
    return float(scipy_stats.ttest_1samp(d, 0.0).pvalue)


def compare(a: list[float], b: list[float], bimodal: bool = False) -> dict:
    """Paired comparison of two cells' per-seed values (same seed order): mean difference a - b,
    its 95 % t interval, the two-sided p-value of the test used, that test's name, and how many seeds
    have a > b and a < b. `bimodal` selects the exact sign-flip test."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs one value per seed on both sides ({len(a)} vs {len(b)})")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    out = {"n": n, "mean_a": float(np.mean(a)) if n else math.nan, "mean_b": float(np.mean(b)) if n else math.nan,
           "diff": float(np.mean(diffs)) if n else math.nan, "ci": t_interval(diffs),
           "n_greater": sum(d > 0 for d in diffs), "n_less": sum(d < 0 for d in diffs)}
    if bimodal:
        out.update(test="sign-flip", p=sign_flip_p(diffs), p_floor=2 / 2**n if n else math.nan)
    else:
        out.update(test="paired t", p=paired_t_p(diffs), p_floor=0.0)
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and are not counted)."""
    finite = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(finite)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(result: dict, expect: str, alpha: float = ALPHA) -> str:
    """'as expected' / 'opposite' when the Holm-adjusted p passes alpha, else 'not distinguishable'."""
    p = result.get("p_holm", result["p"])
    if math.isnan(p) or p >= alpha:
        return "not distinguishable"
    found_greater = result["diff"] > 0
    return "as expected" if found_greater == (expect == "greater") else "opposite"


def wording(result: dict, comparison: Comparison, alpha: float = ALPHA) -> str:
    """The sentence a reading may use for one tested comparison."""
    a, b, col = comparison.a, comparison.b_label, comparison.label
    means = f"{result['mean_a']:.4g} vs {result['mean_b']:.4g}"
    p = f"p = {result['p']:.2g}, Holm-adjusted {result['p_holm']:.2g}, {result['test']}"
    v = verdict(result, comparison.expect, alpha)
    if v == "not distinguishable":
        floor = (f"; a sign-flip test cannot go below p = {result['p_floor']:.3g} at this n"
                 if result["test"] == "sign-flip" else "")
        return f"{a} vs {b} on {col}: {means}, not distinguishable at n = {result['n']} seeds ({p}{floor})"
    rel = ">" if result["diff"] > 0 else "<"
    tail = "as expected" if v == "as expected" else "the opposite of the expected direction"
    return f"{a} {rel} {b} on {col}: {means} ({p}); {tail}"


def untested(test: dict) -> bool:
    """A comparison row (of the report's comparisons) that fewer than two seeds of a side reached."""
    return test.get("n", 2) < 2 or test.get("verdict") == "not run"


def both_below(test: dict, rows: dict[str, dict], floor: float) -> bool:
    """Both sides of a comparison row (its columns read from `rows`, cell -> table row) below `floor`:
    a difference between two unlearned cells (0.003 vs 0.001 accuracy, say) can pass its test and
    still say nothing about the claim."""
    cols, a, b = test["column"].split(" vs "), rows.get(test["a"]), rows.get(test["b"])
    return a is not None and b is not None and max(a.get(cols[0], math.inf), b.get(cols[-1], math.inf)) < floor


def short_wording(test: dict) -> str:
    """A tested comparison as a reading's clause: "found (difference +0.70, 95 % interval [+0.60,
    +0.80], Holm p = 0.01)", "the opposite found (...)", "not shown (...)", or, before two seeds of
    both cells finished, "not tested yet (...)"; `test` is a row of the report's comparisons (verdict,
    diff, ci, p_holm, n)."""
    diff, (lo, hi) = test.get("diff", math.nan), test.get("ci", (math.nan, math.nan))
    finite = [abs(x) for x in (diff, lo, hi) if math.isfinite(x) and x != 0]
    places = 2 if not finite or min(finite) >= 0.005 else 4  # +0.002 or an interval [-0.0003, ...] must not read 0.00
    if untested(test):
        return ("not tested yet (a cell has no finished seed)" if not test.get("n") or test.get("verdict") == "not run"
                else f"not tested yet (1 seed so far, difference {diff:+.{places}f})")
    what = {"as expected": "found", "opposite": "the opposite found"}.get(test.get("verdict"), "not shown")
    agree = test.get("n_greater" if test.get("expect", "greater") == "greater" else "n_less")
    signs = (f"; in the expected direction in {agree} of {test['n']} seeds"  # a consistent sign the test did not pass
             if what == "not shown" and agree is not None and "n" in test else "")
    return (f"{what} (difference {diff:+.{places}f}, 95 % interval [{lo:+.{places}f}, {hi:+.{places}f}], "
            f"Holm p = {test.get('p_holm', math.nan):.2g}{signs})")
