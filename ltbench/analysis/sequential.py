"""Group-sequential verdicts: seeds are added only where a verdict is still undecided, at a kept error rate.

An experiment with ``seeds: {initial: 3, max: 10, step: 2}`` (:class:`Design`) looks at its data at
the planned seed counts n₁ = initial, initial + step, …, max (the last look is always ``max``). Every
test is a t-test on per-seed values: for a claimed gain the paired differences method − over by seed,
for a reproduction test our per-seed value − the paper's value. At look k, with the first nₖ seeds,
t = mean / (sd / √nₖ) on nₖ − 1 degrees of freedom.

Boundaries (Lan–DeMets alpha spending). A one-sided test at level a spends a(t) of it by information
fraction t = nₖ / max: O'Brien–Fleming type (default) a(t) = 2 − 2Φ(z₁₋ₐ/₂ / √t), Pocock type
a(t) = a · ln(1 + (e − 1) t). The z-boundaries c₁ … c_K solve P(Z₁ < c₁, …, Zₖ₋₁ < cₖ₋₁, Zₖ ≥ cₖ) =
a(tₖ) − a(tₖ₋₁) for the canonical joint distribution (corr(Zᵢ, Zⱼ) = √(tᵢ/tⱼ)), by recursive numerical
integration (:func:`z_boundaries`). With an unknown variance each look rejects when its one-sided
t-test p-value is below a nominal level (:func:`nominal_levels`): the spent α itself at the first look
(the t-test is exact there) and, at each later look, the level at which simulated null t-processes
cross with the look's α increment. The normal-theory level 1 − Φ(cₖ) (the "nominal p-value" approach
of Jennison & Turnbull, 2000, ch. 3.8) lets ~10 % too much error through at 3 to 10 seeds. At one
look (initial = max) every rule below is the fixed-design rule of :mod:`compare` and :mod:`gains`.

Decisions:

- a claimed gain (kind ``claim``, ``ablation`` or ``sensitivity``): ``gain`` (the paper's sign) or
  ``below`` (the opposite sign) when the two-sided difference test crosses its boundary (a/2 spent on
  each side, a the Holm level below); ``no gain`` when the two one-sided tests (TOST, α spent on each)
  show |gain| < margin; else ``undecided`` (more seeds come at the next look) and, after the last look,
  ``undecided at max``; ``untested`` when the runs of its next look failed (the grid has those seeds).
- a reproduction test (kind ``reproduction``, one per paper cell): ``reproduced`` (TOST at α spent per
  side, checked first as in :func:`compare.judge`) or ``not reproduced`` (the two-sided test of
  Δ = 0 crosses at α).

Holm across an experiment's claims (each kind of an experiment is one family, as in :mod:`gains`), in
the group-sequential form of Maurer & Bretz (2013, graphical approach with Holm's weights): each of the
m claims' difference tests starts at level α/m; when some are rejected (at any look so far), the others
are re-checked at every look they took with boundaries recomputed at α/(m − rejected), until no more
are rejected. This keeps the family-wise error rate at α.

Stopping for futility: a claim or test stops early only on a decision whose own error rate is spent
(``no gain`` / ``reproduced`` through the TOST's boundaries). These stops are non-binding: the
difference boundaries are computed as if no test ever stopped, so stopping can only lower the error
of a false ``gain``. There is no other futility stop (a conditional-power rule would need a prior on
the effect); an undecided test runs to ``max``.

Assumptions: per-seed values (paired differences for a gain) independent and approximately normal
with a common variance across seeds; the paired design needs both methods at the same seeds, which
the sequential grid guarantees (seeds 0 … n − 1 of every cell).

Looks run in rounds: at round k every undecided test takes look k (its cells then have nₖ seeds),
so the decisions are a function of the runs alone and a restarted driver reaches the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import optimize, stats

from ltbench.analysis import compare, gains
from ltbench.data.longtail import format_ratio
from ltbench.spec import seeds
from ltbench.spec.seeds import DEFAULT_SPENDING, SPENDING, Design

__all__ = ["SPENDING", "Design", "decide", "nominal_levels", "z_boundaries"]

# outcome codes of :func:`decide`
RUNNING, UPPER, LOWER, EQUIVALENT, AT_MAX, WAITING = 0, 1, 2, 3, 4, 5
CLAIM_DECISIONS = {UPPER: "gain", LOWER: "below", EQUIVALENT: "no gain", AT_MAX: "undecided at max"}
REPRO_DECISIONS = {
    UPPER: "not reproduced",
    LOWER: "not reproduced",
    EQUIVALENT: "reproduced",
    AT_MAX: "undecided at max",
}
UNDECIDED = "undecided"
UNTESTED = "untested"  # the grid has the seeds of its next look, but their runs failed (cells.csv says why)
_GRID = 801  # points of the numerical integration (on the score scale, down to -10 sd)


def spent(t: float, alpha: float, spending: str = DEFAULT_SPENDING) -> float:
    """Alpha spent by information fraction ``t`` (Lan–DeMets; module docstring), one-sided level ``alpha``."""
    if t <= 0:
        return 0.0
    t = min(t, 1.0)
    if spending == "pocock":
        return alpha * math.log(1 + (math.e - 1) * t)
    return float(2 * stats.norm.sf(stats.norm.isf(alpha / 2) / math.sqrt(t)))


def _kernel(u: np.ndarray, s: np.ndarray, var: float) -> np.ndarray:
    return np.exp(-((s[:, None] - u[None, :]) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def _weights(x: np.ndarray) -> np.ndarray:
    w = np.full(len(x), x[1] - x[0])
    w[0] = w[-1] = w[0] / 2
    return w


@lru_cache(maxsize=256)
def z_boundaries(fractions: tuple[float, ...], alpha: float, spending: str = DEFAULT_SPENDING) -> tuple[float, ...]:
    """One-sided z-boundaries c₁ … c_K of a group-sequential test at level ``alpha`` (module docstring).

    Recursive integration of the score S = Z√t (independent increments): the sub-density of S at
    look k on the continuation region S < cₖ√tₖ, on a trapezoid grid down to −10. ``inf`` where a look
    spends nothing."""
    out: list[float] = []
    dens = None
    grid = np.empty(0)  # the previous look's grid (the first look has none)
    prev_t, prev_spent = 0.0, 0.0
    for t in fractions:
        inc = spent(t, alpha, spending) - prev_spent
        if dens is None:
            c = float(stats.norm.isf(inc)) if inc > 0 else math.inf
        else:
            var = t - prev_t
            w = dens * _weights(grid)

            def cross(
                c: float, w: np.ndarray = w, var: float = var, t: float = t, grid: np.ndarray = grid, inc: float = inc
            ) -> float:
                return float(np.sum(w * stats.norm.sf((c * math.sqrt(t) - grid) / math.sqrt(var)))) - inc

            c = optimize.brentq(cross, -5.0, 40.0, xtol=1e-10) if inc > 1e-15 else math.inf
        out.append(c)
        upper = min(c, 12.0) * math.sqrt(t)
        new_grid = np.linspace(-10.0, upper, _GRID)
        if dens is None:
            dens = stats.norm.pdf(new_grid / math.sqrt(t)) / math.sqrt(t)
        else:
            dens = _kernel(grid, new_grid, t - prev_t) @ (dens * _weights(grid))
        grid = new_grid
        prev_t, prev_spent = t, spent(t, alpha, spending)
    return tuple(out)


_CAL_PATHS = 400_000  # simulated null sequences behind the t-test's nominal levels (fixed seed: deterministic)
_CAL_SEED = 20261206
_CAL_MIN = 40  # a look whose spending is fewer paths than this keeps the normal-theory level


@lru_cache(maxsize=32)
def _null_pvalues(looks: tuple[int, ...]) -> np.ndarray:
    """One-sided (upper) t-test p-values at each look of ``_CAL_PATHS`` standard normal sequences,
    sorted by nothing (paths × looks, float64). Chunked so that a long design stays in memory."""
    rng = np.random.default_rng(_CAL_SEED)
    out = []
    for start in range(0, _CAL_PATHS, 50_000):
        x = rng.standard_normal((min(50_000, _CAL_PATHS - start), looks[-1]))
        cols = []
        for n in looks:
            h = x[:, :n]
            t = h.mean(axis=1) / (h.std(axis=1, ddof=1) / math.sqrt(n))
            cols.append(stats.t.sf(t, n - 1))
        out.append(np.stack(cols, axis=1))
    return np.asfortranarray(np.concatenate(out))  # columns contiguous: each look is read alone


@lru_cache(maxsize=512)
def _calibrated(looks: tuple[int, ...], alpha: float, spending: str) -> tuple[float, ...]:
    fr = tuple(n / looks[-1] for n in looks)
    p = _null_pvalues(looks)
    targets = np.diff([0.0, *(spent(t, alpha, spending) for t in fr)])
    out, surv = [], np.ones(len(p), dtype=bool)
    for k, inc in enumerate(targets):
        count = int(round(inc * len(p)))
        if k == 0 or count < _CAL_MIN:  # the first look's t-test is exact; tiny spends: normal theory
            q = float(stats.norm.sf(z_boundaries(fr, alpha, spending)[k])) if k else float(inc)
        else:
            left = p[surv, k]
            if count < len(left):
                left = np.partition(left, (count - 1, count))
                q = float((left[count - 1] + left[count]) / 2)
            else:
                q = 1.0
        out.append(q)
        surv &= p[:, k] >= q
    return tuple(out)


def nominal_levels(looks: list[int] | tuple[int, ...], alpha: float, spending: str = DEFAULT_SPENDING) -> np.ndarray:
    """The one-sided nominal p-value each look's t-test (nₖ − 1 df) must go below.

    The first look's is the spent α itself (the t-test is exact there). Each later look's is the
    level at which, among simulated null t-processes (normal seeds, :data:`_CAL_PATHS` of them, a fixed
    seed) that crossed no earlier boundary, the share crossing at this look is the look's α increment:
    with 3 to 10 seeds the normal-theory level 1 − Φ(cₖ) of :func:`z_boundaries` (the "nominal
    p-value" approach) lets about 10 % too much error through, since the early t-statistics are far
    from normal. A look spending fewer than :data:`_CAL_MIN` paths' worth keeps the normal-theory level."""
    return np.array(_calibrated(tuple(int(n) for n in looks), float(alpha), spending))


def t_boundary(nominal: float, n: int) -> float:
    """The t-statistic a look with ``n`` seeds must exceed for a one-sided p below ``nominal``."""
    return float(stats.t.isf(nominal, n - 1)) if nominal > 0 else math.inf


# ---------------------------------------------------------------- statistics at the looks


def look_stats(x: np.ndarray, looks: list[int], margin: float) -> dict[str, np.ndarray]:
    """t-statistics of per-seed values ``x`` (…, N; NaN = not run) at each look (last axis K).

    ``t`` = mean/se, ``t_lo`` = (mean + margin)/se, ``t_hi`` = (mean − margin)/se, ``available`` = the
    look's first n seeds are all there; ``mean``, ``se``. A zero spread gives ±inf (or NaN at 0)."""
    out: dict[str, list] = {k: [] for k in ("mean", "se", "t", "t_lo", "t_hi", "available")}
    for n in looks:
        head = x[..., :n]
        ok = ~np.isnan(head).any(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = head.mean(axis=-1)
            se = head.std(axis=-1, ddof=1) / math.sqrt(n)
            scale = np.maximum(1.0, np.abs(mean))
            se = np.where(se <= 1e-9 * scale, 0.0, se)  # rounding-only spread: zero (compare.constant)
            for key, num in (("t", mean), ("t_lo", mean + margin), ("t_hi", mean - margin)):
                out[key].append(np.where(se > 0, num / np.where(se > 0, se, 1.0), np.sign(num) * np.inf))
        out["mean"].append(mean)
        out["se"].append(se)
        out["available"].append(ok)
    return {k: np.stack(v, axis=-1) for k, v in out.items()}


def _pvalues(st: Mapping[str, np.ndarray], looks: list[int]) -> dict[str, np.ndarray]:
    df = np.array(looks, dtype=float) - 1
    with np.errstate(invalid="ignore"):
        up = stats.t.sf(st["t"], df)
        eq = np.maximum(stats.t.sf(st["t_lo"], df), stats.t.cdf(st["t_hi"], df))
        return {"up": up, "down": stats.t.cdf(st["t"], df), "eq": eq}


def _crossed(p: Mapping[str, np.ndarray], nominal: np.ndarray, taken: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(crossed, upward): whether a taken look's difference test crossed the two-sided boundary
    ``nominal`` (…, K), and whether the first crossing was upward."""
    up = (p["up"] < nominal) & taken
    down = (p["down"] < nominal) & taken
    hit = up | down
    first = np.argmax(hit, axis=-1)
    upward = np.take_along_axis(up, first[..., None], axis=-1)[..., 0]
    return hit.any(axis=-1), upward


@dataclass
class Outcome:
    """What :func:`decide` returns: per test (…, m) its ``code`` (RUNNING … WAITING), ``looks`` taken
    (count), the Holm ``level`` of its difference test, and per look (…, m, K) ``taken``."""

    code: np.ndarray
    looks: np.ndarray
    level: np.ndarray
    taken: np.ndarray


def _holm(
    p: Mapping, taken: np.ndarray, rejected: np.ndarray, up: np.ndarray, nominal: Mapping, holm: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = rejected.shape[-1]
    while True:
        divisor = (m - rejected.sum(axis=-1, keepdims=True)) if holm else np.ones_like(rejected, dtype=int)
        divisor = np.maximum(divisor, 1)
        nom = np.stack([nominal[d] for d in range(1, m + 1)])[divisor - 1]  # (…, m, K) by each row's divisor
        nom = np.broadcast_to(nom, taken.shape)
        hit, upward = _crossed(p, nom, taken)
        new = hit & ~rejected
        up = np.where(new, upward, up)
        rejected = rejected | new
        if not new.any():
            return rejected, up, divisor


def decide(
    x: np.ndarray,
    design: Design,
    margin: float,
    holm: bool = True,
    equivalence_first: bool = False,
) -> Outcome:
    """The group-sequential decisions of tests with per-seed values ``x`` (…, m, N ≥ max; NaN = not run).

    Axis −2 is one Holm family (``holm=False``: each test on its own at α). Rounds as in the module
    docstring: a test still running takes look k when its first nₖ values exist, else it is WAITING
    for seeds. Codes: UPPER / LOWER (the difference test crossed upward / downward), EQUIVALENT (the
    TOST crossed), AT_MAX (undecided after the last look), WAITING, RUNNING (never returned)."""
    looks = design.looks()
    st = look_stats(x[..., : design.max], looks, margin)
    p = _pvalues(st, looks)
    m, k_max = x.shape[-2], len(looks)
    nominal = {d: nominal_levels(looks, design.alpha / d / 2, design.spending) for d in range(1, m + 1)}
    nominal_eq = nominal_levels(looks, design.alpha, design.spending)
    shape = x.shape[:-1]
    code = np.full(shape, RUNNING)
    taken = np.zeros((*shape, k_max), dtype=bool)
    rejected, up = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    divisor = np.ones(shape, dtype=int)
    for k in range(k_max):
        running = code == RUNNING
        look = running & st["available"][..., k]
        code = np.where(running & ~look, WAITING, code)
        taken[..., k] = look
        rejected, up, divisor = _holm(p, taken, rejected, up, nominal, holm)
        equivalent = look & (p["eq"][..., k] < nominal_eq[k])
        first = equivalent if equivalence_first else ~rejected
        decided = np.where(equivalent & first, EQUIVALENT, np.where(up, UPPER, LOWER))
        code = np.where(look & (rejected | equivalent), decided, code)
        if k == k_max - 1:
            code = np.where(code == RUNNING, AT_MAX, code)
    if not equivalence_first:  # Holm's later steps may reject a claim that stopped: the rejection wins
        code = np.where(rejected, np.where(up, UPPER, LOWER), code)
    level = np.broadcast_to(design.alpha / divisor, shape).copy() if holm else np.full(shape, design.alpha)
    return Outcome(code=code, looks=taken.sum(axis=-1), level=level, taken=taken)


# ---------------------------------------------------------------- the tests of an experiment

TEST_COLUMNS = ["experiment", "kind", "test", "dataset", "ratio", "backbone", "metric", "method", "over"]
LOOK_COLUMNS = [
    "experiment",
    "kind",
    "test",
    "description",
    "dataset",
    "ratio",
    "backbone",
    "metric",
    "method",
    "over",
    "paper_value",
    "expected_sign",
    "margin",
    "look",
    "n",
    "estimate",
    "se",
    "t",
    "level",
    "boundary_t",
    "equiv_t",
    "equiv_boundary_t",
    "at_look",
    "decision",
    "seeds_used",
    "next_n",
]


def _values(runs: pd.DataFrame, cell: Mapping, method: str, n_max: int) -> np.ndarray:
    """Per-seed values (seeds 0 … n_max − 1; NaN = no run) of one method at a cell and metric."""
    sel = runs[
        (runs["dataset"] == cell["dataset"])
        & (runs["ratio"].astype(float) == float(cell["ratio"]))
        & (runs["method"] == method)
        & (runs["backbone"] == cell["backbone"])
        & (runs["metric"] == cell["metric"])
    ]
    x = np.full(n_max, np.nan)
    for s, v in zip(sel["seed"].astype(int), sel["value"].astype(float), strict=True):
        if 0 <= s < n_max:
            x[s] = v
    return x


def _claim_tests(runs: pd.DataFrame, exp: Mapping, kind: str, n_max: int) -> list[dict]:
    claims = gains.experiment_claims(exp) if kind == "claim" else gains.over_claims(exp)
    out = []
    for c in claims:
        metric = c.get("metric", "top1")
        for cell in c["cells"]:
            cell = {**cell, "backbone": c["backbone"], "metric": metric}
            sign = int(c.get("expected_sign", 1))
            diff = _values(runs, cell, c["method"], n_max) - _values(runs, cell, c["over"], n_max)
            out.append(
                {
                    **{k: cell[k] for k in ("dataset", "ratio", "backbone", "metric")},
                    "kind": kind,
                    "test": c["id"],
                    "description": c.get("description", ""),
                    "method": c["method"],
                    "over": c["over"],
                    "paper_value": math.nan,
                    "expected_sign": sign,
                    "x": sign * diff,  # the expected direction is up
                }
            )
    return out


def _reproduction_tests(runs: pd.DataFrame, exp: Mapping, n_max: int) -> list[dict]:
    scope = compare.entries_in_scope(compare.reference_table(exp), exp)
    out = []
    for e in scope.to_dict("records"):
        if e["method"] not in exp["methods"] or pd.isna(e["value"]):
            continue
        cell = {k: e[k] for k in ("dataset", "ratio", "backbone", "metric")}
        out.append(
            {
                **cell,
                "kind": "reproduction",
                "test": f"table {e.get('table')}" if not pd.isna(e.get("table")) else "reference",
                "description": f"{e['method']} vs the paper's {e['value']:g}",
                "method": e["method"],
                "over": "",
                "paper_value": float(e["value"]),
                "expected_sign": 1,
                "x": _values(runs, cell, e["method"], n_max) - float(e["value"]),
            }
        )
    return out


def experiment_tests(runs: pd.DataFrame, exp: Mapping) -> dict[str, list[dict]]:
    """The experiment's sequential tests by family (``claim``, ``ablation`` / ``sensitivity``,
    ``reproduction``), each with its per-seed values ``x`` (length ``max``)."""
    n_max = int(exp["sequential"]["max"])
    fam: dict[str, list[dict]] = {}
    if exp.get("reference"):
        fam["claim"] = _claim_tests(runs, exp, "claim", n_max)
        fam["reproduction"] = _reproduction_tests(runs, exp, n_max)
    if exp.get("figure") in ("ablation", "sensitivity") and len(exp["methods"]) > 1:
        fam[exp["figure"]] = _claim_tests(runs, exp, exp["figure"], n_max)
    return {k: v for k, v in fam.items() if v}


def _look_row(base: Mapping, st: Mapping, i: int, k: int, n: int, bounds: tuple[float, float]) -> dict:
    sign = base["expected_sign"]
    t_lo, t_hi = st["t_lo"][0, i, k], st["t_hi"][0, i, k]
    return {
        **base,
        "look": k + 1,
        "n": n,
        "estimate": sign * st["mean"][0, i, k],
        "se": st["se"][0, i, k],
        "t": sign * st["t"][0, i, k],
        "boundary_t": bounds[0],
        "equiv_t": min(t_lo, -t_hi),
        "equiv_boundary_t": bounds[1],
    }


def _family_rows(name: str, tests: list[dict], design: Design, margin: float) -> list[dict]:
    """One row per test and look taken (a row with look 0 for a test that took none)."""
    repro = tests[0]["kind"] == "reproduction"
    names = REPRO_DECISIONS if repro else CLAIM_DECISIONS
    x = np.stack([t["x"] for t in tests])[None]
    out = decide(x, design, margin, holm=not repro, equivalence_first=repro)
    looks = design.looks()
    st = look_stats(x, looks, margin)
    eq_nominal = nominal_levels(looks, design.alpha, design.spending)
    rows = []
    for i, t in enumerate(tests):
        code, level, k_taken = int(out.code[0, i]), float(out.level[0, i]), int(out.looks[0, i])
        nominal = nominal_levels(looks, level / 2, design.spending)
        waiting = code == WAITING
        base = {
            **{k: v for k, v in t.items() if k != "x"},
            "experiment": name,
            "margin": margin,
            "level": level,
            "decision": names.get(code, UNDECIDED),
            "seeds_used": looks[k_taken - 1] if k_taken else 0,
            "next_n": looks[k_taken] if waiting and k_taken < len(looks) else None,
        }
        if not k_taken:
            rows.append({**base, "look": 0, "n": 0, "at_look": "waiting for seeds"})
        for k in range(k_taken):
            bounds = t_boundary(nominal[k], looks[k]), t_boundary(eq_nominal[k], looks[k])
            last = k == k_taken - 1 and not waiting
            rows.append(
                {**_look_row(base, st, i, k, looks[k], bounds), "at_look": base["decision"] if last else "continue"}
            )
    return rows


def experiment_table(runs: pd.DataFrame, name: str, exp: Mapping, margin: float) -> pd.DataFrame:
    """The looks of a sequential experiment's tests (columns :data:`LOOK_COLUMNS`); empty for a fixed design.

    ``boundary_t`` is the |t| the difference test had to exceed at that look, at the test's final
    Holm ``level``; ``equiv_t`` the smaller of the TOST's two t-statistics and ``equiv_boundary_t`` what
    it had to exceed; ``t`` and ``estimate`` are in the claim's own units (method − over, or ours −
    paper). ``decision`` is the test's; ``next_n`` the seeds its next look needs while undecided."""
    if not exp.get("sequential"):
        return pd.DataFrame(columns=LOOK_COLUMNS)
    design = Design.of(exp["sequential"])
    rows = []
    for tests in experiment_tests(runs, exp).values():
        rows += _family_rows(name, tests, design, margin)
    for r in rows:  # the grid already has the seeds its next look needs: those runs failed (or are missing)
        if r["decision"] == UNDECIDED and r["next_n"] is not None and _has_seeds(exp, r, int(r["next_n"])):
            r["decision"], r["next_n"] = UNTESTED, None
    return pd.DataFrame(rows, columns=LOOK_COLUMNS)


def _has_seeds(exp: Mapping, r: Mapping, n: int) -> bool:
    methods = [m for m in (r["method"], r["over"]) if m]
    ratio = format_ratio(float(r["ratio"]))
    return all(len(seeds.cell_seeds(exp, seeds.cell_key(r["dataset"], ratio, m, r["backbone"]))) >= n for m in methods)


def table(runs: pd.DataFrame, cfg: Mapping) -> pd.DataFrame:
    """:func:`experiment_table` over the config's sequential experiments (``sequential.csv``)."""
    frames = [
        experiment_table(runs, name, exp, compare.margin_of(exp, cfg))
        for name, exp in cfg["experiments"].items()
        if exp.get("sequential")
    ]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LOOK_COLUMNS)


def needed_seeds(looks: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{experiment: {cell key: seeds}} that the undecided tests' next looks need (both methods of a claim)."""
    out: dict[str, dict[str, int]] = {}
    todo = looks[(looks["decision"] == UNDECIDED) & looks["next_n"].notna()]
    for r in todo.drop_duplicates(TEST_COLUMNS).to_dict("records"):
        ratio = format_ratio(float(r["ratio"]))
        for m in (r["method"], r["over"]):
            if isinstance(m, str) and m:
                key = seeds.cell_key(r["dataset"], ratio, m, r["backbone"])
                cells = out.setdefault(r["experiment"], {})
                cells[key] = max(cells.get(key, 0), int(r["next_n"]))
    return out


def counts(looks: pd.DataFrame) -> pd.DataFrame:
    """Decisions per experiment and kind (one test counted once): what the driver prints each round."""
    last = looks.drop_duplicates(TEST_COLUMNS, keep="last")
    return last.groupby(["experiment", "kind", "decision"]).size().rename("tests").reset_index()


def expected_seeds(estimate: float, sd: float, design: Design, margin: float, level: float, sims: int = 4000) -> float:
    """Expected seeds of one test whose true value and per-seed spread are ``estimate`` and ``sd`` (a
    plug-in: the observed ones), by simulating the design with its difference test at ``level``."""
    if not (sd > 0) or math.isnan(estimate):
        return float(design.initial)
    rng = np.random.default_rng(0)
    plan = Design(design.initial, design.max, design.step, design.spending, min(level, design.alpha))
    out = decide(rng.normal(estimate, sd, (sims, 1, design.max)), plan, margin, holm=False)
    return float(np.array(design.looks())[out.looks[:, 0] - 1].mean())


def expected_cell_seeds(looks: pd.DataFrame, exp: Mapping, name: str) -> dict[str, float]:
    """{cell key: expected seeds} of a sequential experiment from its looks so far: a decided test
    keeps the seeds it used; an undecided one gets :func:`expected_seeds` at its last look's estimate
    and spread (at least the seeds it has); a cell takes the most of its tests."""
    design = Design.of(exp["sequential"])
    own = looks[(looks["experiment"] == name) & (looks["look"] > 0)]
    out: dict[str, float] = {}
    for r in own.drop_duplicates(TEST_COLUMNS, keep="last").to_dict("records"):
        n = float(r["seeds_used"])
        if r["decision"] == UNDECIDED:
            sd = float(r["se"]) * math.sqrt(r["n"])
            n = max(n, expected_seeds(float(r["estimate"]), sd, design, float(r["margin"]), float(r["level"])))
        for m in (r["method"], r["over"]):
            if isinstance(m, str) and m:
                key = seeds.cell_key(r["dataset"], format_ratio(float(r["ratio"])), m, r["backbone"])
                out[key] = max(out.get(key, 0.0), n)
    return out
