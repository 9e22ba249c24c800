"""Statistics across seeds, verdicts and claimed-gain tests (ltbench.analysis.compare)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ltbench.analysis.compare import compare, gains, summarize

T975_DF2 = 4.302652729749462  # Student t 97.5% quantile, 2 degrees of freedom (tables: 4.303)
T95_DF2 = 2.919985580353724   # Student t 95% quantile, 2 degrees of freedom (tables: 2.920)


def runs_of(values: dict, dataset="cifar100", ratio=100, backbone="resnet32", metric="top1") -> pd.DataFrame:
    """{method: {seed: value}} -> tidy runs table."""
    return pd.DataFrame([dict(dataset=dataset, ratio=ratio, method=m, backbone=backbone, seed=s, metric=metric,
                              value=v) for m, by_seed in values.items() for s, v in by_seed.items()])


def ref_of(*rows) -> pd.DataFrame:
    """(method, value, quoted) rows for cifar100/100/resnet32/top1 -> reference table."""
    return pd.DataFrame([dict(table=2, dataset="cifar100", ratio=100, method=m, backbone="resnet32", metric="top1",
                              value=v, quoted=q) for m, v, q in rows])


# ---------------------------------------------------------------- summarize

def test_summarize_three_seeds_by_hand():
    s = summarize(runs_of({"baseline": {0: 50.0, 1: 51.0, 2: 53.0}})).iloc[0]
    mean = (50 + 51 + 53) / 3
    std = math.sqrt(((50 - mean) ** 2 + (51 - mean) ** 2 + (53 - mean) ** 2) / 2)  # ddof = 1
    half = T975_DF2 * std / math.sqrt(3)
    assert s["n"] == 3 and s["seeds"] == [0, 1, 2] and s["ci_level"] == 0.95
    assert s["mean"] == pytest.approx(mean, abs=1e-12)
    assert s["std"] == pytest.approx(std, abs=1e-12) and s["std"] == pytest.approx(1.5275252316519465)
    assert s["ci_low"] == pytest.approx(mean - half, abs=1e-9) and s["ci_high"] == pytest.approx(mean + half, abs=1e-9)
    assert half == pytest.approx(3.7945830335967594)


def test_summarize_ci_level_argument():
    s = summarize(runs_of({"baseline": {0: 50.0, 1: 51.0, 2: 53.0}}), level=0.90).iloc[0]
    assert s["ci_high"] - s["mean"] == pytest.approx(T95_DF2 * 1.5275252316519465 / math.sqrt(3), abs=1e-9)
    assert s["ci_level"] == 0.90


def test_summarize_single_seed_has_no_std_or_ci():
    s = summarize(runs_of({"baseline": {7: 50.0}})).iloc[0]
    assert s["n"] == 1 and s["mean"] == 50.0 and s["seeds"] == [7]
    assert math.isnan(s["std"]) and math.isnan(s["ci_low"]) and math.isnan(s["ci_high"])


def test_summarize_groups_by_every_cell_key():
    runs = pd.concat([runs_of({"baseline": {0: 50.0, 1: 52.0}}),
                      runs_of({"baseline": {0: 80.0}}, dataset="cifar10"),
                      runs_of({"baseline": {0: 70.0}}, metric="many"),
                      runs_of({"baseline": {0: 60.0}}, ratio=50),
                      runs_of({"baseline": {0: 40.0}}, backbone="resnet56")])
    s = summarize(runs)
    assert len(s) == 5
    row = s[(s.dataset == "cifar100") & (s.ratio == 100) & (s.metric == "top1") & (s.backbone == "resnet32")]
    assert row["mean"].item() == 51.0 and row["n"].item() == 2


@pytest.mark.parametrize("bad, match", [
    (lambda r: r.drop(columns="seed"), "seed"),
    (lambda r: pd.concat([r, r.iloc[[0]]]), "more than one value per cell and seed"),
    (lambda r: r.assign(value=[50.0, float("nan")]), "NaN"),
])
def test_summarize_rejects_bad_runs(bad, match):
    with pytest.raises(ValueError, match=match):
        summarize(bad(runs_of({"baseline": {0: 50.0, 1: 51.0}})))


# ---------------------------------------------------------------- verdicts

def verdict_for(ours: dict, paper: float, quoted=False, tolerance=1.0):
    out = compare(summarize(runs_of({"baseline": ours})), ref_of(("baseline", paper, quoted)), tolerance=tolerance)
    assert len(out) == 1
    return out.iloc[0]


@pytest.mark.parametrize("ours, paper, expected", [
    (82.87, 81.87, "reproduced"),  # delta = +1.00
    (80.87, 81.87, "reproduced"),  # delta = -1.00
    (64.01, 63.01, "reproduced"),  # delta = +1.00 in decimal, 1.000000000000007 in floating point
    (63.01, 64.01, "reproduced"),  # delta = -1.00 in decimal, -1.000000000000007 in floating point
    (82.88, 81.87, "above"),       # delta = +1.01
    (80.86, 81.87, "below"),       # delta = -1.01
    (81.87, 81.87, "reproduced"),
])
def test_tolerance_boundaries_single_seed(ours, paper, expected):
    r = verdict_for({0: ours}, paper)
    assert r["verdict"] == expected
    assert r["delta"] == pytest.approx(ours - paper)
    assert r["paper_value"] == paper and r["mean"] == ours and r["n"] == 1


def test_tolerance_is_an_argument():
    assert verdict_for({0: 82.67}, 81.87, tolerance=0.5)["verdict"] == "above"
    assert verdict_for({0: 82.67}, 81.87, tolerance=1.0)["verdict"] == "reproduced"


def test_ci_covering_the_paper_value_counts_as_reproduced():
    # mean 51.33, 95% CI [47.54, 55.13] (see test_summarize_three_seeds_by_hand)
    r = verdict_for({0: 50.0, 1: 51.0, 2: 53.0}, 55.0)
    assert r["delta"] == pytest.approx(-3.6666666666, abs=1e-6) and r["verdict"] == "reproduced"
    assert verdict_for({0: 50.0, 1: 51.0, 2: 53.0}, 55.2)["verdict"] == "below"   # just outside the CI
    assert verdict_for({0: 50.0, 1: 51.0, 2: 53.0}, 47.5)["verdict"] == "above"   # just below ci_low
    assert verdict_for({0: 50.0, 1: 51.0, 2: 53.0}, 47.6)["verdict"] == "reproduced"


def test_missing_quoted_and_not_reported():
    summary = summarize(runs_of({"baseline": {0: 50.0}, "vs": {0: 44.0}}))
    ref = ref_of(("baseline+cbn", 52.16, False),   # never run
                 ("mislas", 47.0, True),           # quoted, never run
                 ("lade", float("nan"), True),     # '–' in the paper
                 ("baseline", None, False),        # null: user has not filled it in, although we ran it
                 ("vs", 43.5, True))               # quoted, but we ran it: judged like any other entry
    out = compare(summary, ref).set_index("method")
    assert out.loc["baseline+cbn", "verdict"] == "missing" and out.loc["baseline+cbn", "n"] == 0
    assert math.isnan(out.loc["baseline+cbn", "mean"])
    assert out.loc["mislas", "verdict"] == "quoted"
    assert out.loc["lade", "verdict"] == "not reported"
    assert out.loc["baseline", "verdict"] == "not reported" and out.loc["baseline", "mean"] == 50.0
    assert out.loc["vs", "verdict"] == "reproduced"


def test_compare_against_packaged_reference_keeps_every_entry():
    from ltbench.analysis.reference import entries

    ref = entries("cbn2022")
    out = compare(summarize(runs_of({"baseline": {0: 49.0, 1: 50.0}})), ref)
    assert len(out) == len(ref)
    ran = out[out.n > 0]
    assert set(zip(ran.table, ran.row.fillna(""))) == {(2, ""), (3, "I")}  # Table 2 and Table 3 row I
    assert (ran.verdict == "reproduced").all()
    counts = out.verdict.value_counts().to_dict()
    assert counts["not reported"] == 21 and counts["reproduced"] == 2
    assert counts["quoted"] == int((ref.quoted & ref.value.notna()).sum())


def test_compare_wants_a_summary_not_runs():
    with pytest.raises(ValueError, match="summarize"):
        compare(runs_of({"baseline": {0: 1.0}}), ref_of(("baseline", 1.0, False)))


# ---------------------------------------------------------------- gains

CLAIM = [dict(id="t2-cbn", table=2, description="+CBN over Baseline", method="baseline+cbn", over="baseline",
              backbone="resnet32", cells=[dict(dataset="cifar100", ratio=100)])]
A = {0: 52.0, 1: 53.5, 2: 52.7}
B = {0: 50.1, 1: 50.9, 2: 49.8}


def test_gains_welch_and_paired_match_scipy():
    # rows of the two methods in different seed orders: the paired test must pair by seed
    runs = pd.concat([runs_of({"baseline+cbn": A}), runs_of({"baseline": dict(reversed(list(B.items())))})])
    ref = ref_of(("baseline+cbn", 52.16, False), ("baseline", 49.66, False))
    g = gains(runs, CLAIM, ref).iloc[0]
    a, b = np.array([52.0, 53.5, 52.7]), np.array([50.1, 50.9, 49.8])
    welch = stats.ttest_ind(a, b, equal_var=False)
    paired = stats.ttest_rel(a, b)
    assert g["welch_p"] == pytest.approx(welch.pvalue, rel=1e-12) and g["welch_t"] == pytest.approx(welch.statistic)
    assert g["paired_p"] == pytest.approx(paired.pvalue, rel=1e-12)
    assert g["paired_t"] == pytest.approx(paired.statistic)
    assert g["paired_p"] != pytest.approx(stats.ttest_rel(a, b[::-1]).pvalue)  # misalignment would differ
    assert g["gain"] == pytest.approx(a.mean() - b.mean()) and g["paper_gain"] == pytest.approx(2.5)
    assert g["n_method"] == 3 and g["n_over"] == 3 and g["explanation"] == ""


def test_gains_different_seeds_give_welch_only():
    runs = pd.concat([runs_of({"baseline+cbn": A}), runs_of({"baseline": {3: 50.1, 4: 50.9}})])
    g = gains(runs, CLAIM).iloc[0]
    assert g["welch_p"] == pytest.approx(stats.ttest_ind([52.0, 53.5, 52.7], [50.1, 50.9], equal_var=False).pvalue)
    assert math.isnan(g["paired_p"]) and "seeds differ" in g["explanation"]
    assert math.isnan(g["paper_gain"])  # no reference table given


def test_gains_single_seed_and_missing_runs_explain_nan():
    g = gains(pd.concat([runs_of({"baseline+cbn": {0: 52.0}}), runs_of({"baseline": B})]), CLAIM).iloc[0]
    assert math.isnan(g["welch_p"]) and math.isnan(g["paired_p"])
    assert "only 1 run of 'baseline+cbn'" in g["explanation"] and "n >= 2" in g["explanation"]
    assert g["gain"] == pytest.approx(52.0 - np.mean(list(B.values())))
    g = gains(runs_of({"baseline": B}), CLAIM).iloc[0]
    assert math.isnan(g["gain"]) and math.isnan(g["welch_p"]) and "no runs of 'baseline+cbn'" in g["explanation"]


def test_gains_uses_claim_metric_and_backbone():
    claim = [dict(CLAIM[0], metric="few")]
    runs = pd.concat([runs_of({"baseline+cbn": A, "baseline": B}, metric="top1"),
                      runs_of({"baseline+cbn": {0: 30.0, 1: 31.0}, "baseline": {0: 28.0, 1: 28.5}}, metric="few"),
                      runs_of({"baseline+cbn": {0: 99.0, 1: 99.0}}, metric="few", backbone="resnet56")])
    g = gains(runs, claim).iloc[0]
    assert g["metric"] == "few" and g["gain"] == pytest.approx(30.5 - 28.25) and g["n_method"] == 2


def test_gains_from_paper_id_cover_every_claim_cell():
    g = gains(runs_of({"baseline": B}), "cbn2022")
    assert len(g) == 5 * 6 + 6 and g.paper_gain.notna().all()
    t3 = g[g.claim == "t3-cbn-dt-rw-rs"].iloc[0]
    assert t3["paper_gain"] == pytest.approx(52.86 - 50.66)
