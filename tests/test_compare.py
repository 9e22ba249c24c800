"""Statistics across seeds, graded verdicts, power / seeds needed, and claimed-gain tests
(ltbench.analysis.compare, ltbench.analysis.power, ltbench.analysis.gains)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ltbench.analysis import power
from ltbench.analysis.compare import compare, decision_line, judge, summarize
from ltbench.analysis.gains import gains, judge_gains

T975_DF2 = 4.302652729749462  # Student t 97.5% quantile, 2 degrees of freedom (tables: 4.303)
T95_DF2 = 2.919985580353724  # Student t 95% quantile, 2 degrees of freedom (tables: 2.920)


def runs_of(values: dict, dataset="cifar100", ratio=100, backbone="resnet32", metric="top1") -> pd.DataFrame:
    """{method: {seed: value}} -> tidy runs table."""
    return pd.DataFrame(
        [
            dict(dataset=dataset, ratio=ratio, method=m, backbone=backbone, seed=s, metric=metric, value=v)
            for m, by_seed in values.items()
            for s, v in by_seed.items()
        ]
    )


def ref_of(*rows) -> pd.DataFrame:
    """(method, value, quoted) rows for cifar100/100/resnet32/top1 -> reference table."""
    return pd.DataFrame(
        [
            dict(
                table=2, dataset="cifar100", ratio=100, method=m, backbone="resnet32", metric="top1", value=v, quoted=q
            )
            for m, v, q in rows
        ]
    )


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
    runs = pd.concat(
        [
            runs_of({"baseline": {0: 50.0, 1: 52.0}}),
            runs_of({"baseline": {0: 80.0}}, dataset="cifar10"),
            runs_of({"baseline": {0: 70.0}}, metric="many"),
            runs_of({"baseline": {0: 60.0}}, ratio=50),
            runs_of({"baseline": {0: 40.0}}, backbone="resnet56"),
        ]
    )
    s = summarize(runs)
    assert len(s) == 5
    row = s[(s.dataset == "cifar100") & (s.ratio == 100) & (s.metric == "top1") & (s.backbone == "resnet32")]
    assert row["mean"].item() == 51.0 and row["n"].item() == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda r: r.drop(columns="seed"), "seed"),
        (lambda r: pd.concat([r, r.iloc[[0]]]), "more than one value per cell and seed"),
        (lambda r: r.assign(value=[50.0, float("nan")]), "NaN"),
    ],
)
def test_summarize_rejects_bad_runs(bad, match):
    with pytest.raises(ValueError, match=match):
        summarize(bad(runs_of({"baseline": {0: 50.0, 1: 51.0}})))


# ---------------------------------------------------------------- verdicts


def verdict_for(ours: dict, paper: float, quoted=False, margin=1.0):
    out = compare(summarize(runs_of({"baseline": ours})), ref_of(("baseline", paper, quoted)), margin=margin)
    assert len(out) == 1
    return out.iloc[0]


def test_two_seeds_far_from_the_paper_with_a_wide_interval_are_inconclusive():
    # mean 49, std 5.66: the 95 % interval (± 12.7 · 4) holds the paper's 50, but nothing is shown equivalent
    r = verdict_for({0: 45.0, 1: 53.0}, 50.0)
    assert r["verdict"] == "inconclusive" and r["delta"] == pytest.approx(-1.0)
    half90 = stats.t.ppf(0.95, 1) * np.std([45.0, 53.0], ddof=1) / math.sqrt(2)
    assert r["tost_low"] == pytest.approx(-1.0 - half90) and r["tost_high"] == pytest.approx(-1.0 + half90)
    # |Δ| >= margin: deciding it means showing the difference (t-test); the smallest n with 80 % power
    n, sd = r["seeds_needed"], np.std([45.0, 53.0], ddof=1)
    assert r["seeds_test"] == "t-test" and n > 2
    assert power.difference_power(-1.0, sd, n) >= 0.8 > power.difference_power(-1.0, sd, n - 1)


def test_five_seeds_tightly_around_the_paper_reproduce():
    r = verdict_for({0: 50.1, 1: 49.9, 2: 50.0, 3: 50.2, 4: 49.8}, 50.0)
    assert r["verdict"] == "reproduced" and -1 < r["tost_low"] < 0 < r["tost_high"] < 1 and r["tost_p"] < 0.05
    assert pd.isna(r["seeds_needed"]) and r["seeds_test"] == ""


def test_tight_and_three_points_off_is_below_or_above():
    assert verdict_for({0: 47.1, 1: 46.9, 2: 47.0}, 50.0)["verdict"] == "below"
    assert verdict_for({0: 53.1, 1: 52.9, 2: 53.0}, 50.0)["verdict"] == "above"


def test_one_seed_is_a_single_run_never_reproduced():
    r = verdict_for({0: 50.4}, 50.0)
    assert r["verdict"] == "single run" and r["delta"] == pytest.approx(0.4) and r["n"] == 1
    assert verdict_for({0: 80.0}, 50.0)["verdict"] == "single run"


def test_equivalence_with_zero_spread_and_floating_point_margin():
    # three identical seeds: the interval is the point Δ; 64.01 - 63.01 = 1.000000000000007 counts as 1.0
    assert verdict_for({0: 64.01, 1: 64.01, 2: 64.01}, 63.01)["verdict"] == "reproduced"
    assert verdict_for({0: 63.01, 1: 63.01, 2: 63.01}, 64.01)["verdict"] == "reproduced"
    assert verdict_for({0: 64.02, 1: 64.02, 2: 64.02}, 63.01)["verdict"] == "above"


def test_margin_is_an_argument():
    ours = {0: 51.4, 1: 51.5, 2: 51.6}
    assert verdict_for(ours, 50.0, margin=1.0)["verdict"] == "above"
    r = verdict_for(ours, 50.0, margin=2.0)
    assert r["verdict"] == "reproduced" and r["margin"] == 2.0


def test_paper_inside_the_95_interval_without_equivalence_is_inconclusive():
    # mean 51.33, 95% CI [47.54, 55.13] (see test_summarize_three_seeds_by_hand): not reproduced any more
    r = verdict_for({0: 50.0, 1: 51.0, 2: 53.0}, 55.0)
    assert r["delta"] == pytest.approx(-3.6666666666, abs=1e-6) and r["verdict"] == "inconclusive"
    assert verdict_for({0: 50.0, 1: 51.0, 2: 53.0}, 55.2)["verdict"] == "below"  # just outside the CI
    assert verdict_for({0: 50.0, 1: 51.0, 2: 53.0}, 47.5)["verdict"] == "above"  # just below ci_low
    assert verdict_for({0: 50.0, 1: 51.0, 2: 53.0}, 47.6)["verdict"] == "inconclusive"


def test_judge_needs_equivalence_inside_the_margin_for_an_inconclusive_cell():
    # |Δ| = 0.3 < margin: the seeds figure is for the TOST, and it reaches 80 % power there
    j = judge(50.0, 50.3, 1.0, 3, 47.8, 52.8)
    assert j["verdict"] == "inconclusive" and j["seeds_test"] == "TOST"
    n = j["seeds_needed"]
    assert power.equivalence_power(0.3, 1.0, 1.0, n) >= 0.8 > power.equivalence_power(0.3, 1.0, 1.0, n - 1)


def test_missing_quoted_and_not_reported():
    summary = summarize(runs_of({"baseline": {0: 50.0}, "vs": {0: 44.0, 1: 43.0}}))
    ref = ref_of(
        ("baseline+cbn", 52.16, False),  # never run
        ("mislas", 47.0, True),  # quoted, never run
        ("lade", float("nan"), True),  # '–' in the paper
        ("baseline", None, False),  # null: user has not filled it in, although we ran it
        ("vs", 43.5, True),
    )  # quoted, but we ran it: judged like any other entry
    out = compare(summary, ref).set_index("method")
    assert out.loc["baseline+cbn", "verdict"] == "missing" and out.loc["baseline+cbn", "n"] == 0
    assert math.isnan(out.loc["baseline+cbn", "mean"])
    assert out.loc["mislas", "verdict"] == "quoted"
    assert out.loc["lade", "verdict"] == "not reported"
    assert out.loc["baseline", "verdict"] == "not reported" and out.loc["baseline", "mean"] == 50.0
    assert out.loc["vs", "verdict"] == "inconclusive"


def test_compare_against_packaged_reference_keeps_every_entry():
    from ltbench.analysis.reference import entries

    ref = entries("cbn2022")
    out = compare(summarize(runs_of({"baseline": {0: 49.0, 1: 50.0}})), ref)
    assert len(out) == len(ref)
    ran = out[out.n > 0]
    assert set(zip(ran.table, ran.row.fillna(""), strict=True)) == {(2, ""), (3, "I")}  # Table 2 and Table 3 row I
    assert (ran.verdict == "inconclusive").all()  # 2 seeds: the 90 % interval is ± 6.31 · 0.5
    counts = out.verdict.value_counts().to_dict()
    assert counts["not reported"] == 21 and counts["inconclusive"] == 2
    assert counts["quoted"] == int((ref.quoted & ref.value.notna()).sum())


def test_compare_wants_a_summary_not_runs():
    with pytest.raises(ValueError, match="summarize"):
        compare(runs_of({"baseline": {0: 1.0}}), ref_of(("baseline", 1.0, False)))


def test_decision_line_counts_and_extra_seeds():
    df = pd.DataFrame(
        {
            "verdict": ["inconclusive", "inconclusive", "inconclusive", "reproduced", "missing", "inconclusive"],
            "n": [3, 3, 3, 3, 0, 3],
            "seeds_needed": [5, 4, 20, None, None, None],
        }
    ).astype({"seeds_needed": "Int64"})
    assert decision_line(df) == (
        "4 of 5 cells inconclusive; 2 more seeds would decide 2 of them, 17 more all 3; "
        f"1 would need more than {power.MAX_SEEDS} seeds"
    )
    assert decision_line(df[df.verdict == "missing"]) == ""


# ---------------------------------------------------------------- power and seeds needed


@pytest.mark.parametrize(
    "effect, n, expected_power",
    [
        (0.5, 34, 0.8078),  # G*Power 3.1, one-sample / paired t, two-tailed α 0.05, d = 0.5: n = 34, power 0.808
        (1.0, 10, 0.8031),  # d = 1: n = 10, power 0.803
    ],
)
def test_one_sample_power_matches_gpower(effect, n, expected_power):
    assert power.difference_power(effect, 1.0, n) == pytest.approx(expected_power, abs=1e-4)
    assert power.seeds_needed(lambda k: power.difference_power(effect, 1.0, k)) == n


def test_welch_power_matches_the_two_sample_table():
    # Cohen's table / G*Power: two-sample t, d = 0.5, α 0.05 two-tailed, 80 % power: 64 per group (0.8015)
    scale, df_per = power.welch_scale(1.0, 1.0)
    assert df_per == pytest.approx(2.0)
    assert power.difference_power(0.5, scale, 64, df_per) == pytest.approx(0.8015, abs=1e-4)
    assert power.seeds_needed(lambda n: power.difference_power(0.5, scale, n, df_per)) == 64


def test_tost_power_agrees_with_simulation():
    rng = np.random.default_rng(0)
    n = power.seeds_needed(lambda k: power.equivalence_power(0.0, 1.0, 1.0, k))
    assert 8 <= n <= 14  # normal approximation: (z_0.95 + z_0.90)² ≈ 8.6 seeds, plus the t penalty
    x = rng.normal(0.0, 1.0, size=(20000, n))
    m, se = x.mean(1), x.std(1, ddof=1) / math.sqrt(n)
    t = stats.t.ppf(0.95, n - 1)
    simulated = np.mean((m - t * se > -1.0) & (m + t * se < 1.0))
    assert power.equivalence_power(0.0, 1.0, 1.0, n) <= simulated + 0.01  # a lower bound ...
    assert simulated == pytest.approx(power.equivalence_power(0.0, 1.0, 1.0, n), abs=0.03)  # ... and close
    assert simulated >= 0.79


def test_seeds_needed_beyond_the_cap_is_none():
    assert power.seeds_needed(lambda n: power.difference_power(0.01, 10.0, n)) is None
    assert power.seeds_to_decide(0.01, 10.0, 0.0) == (None, "t-test")
    assert power.seeds_to_decide(0.5, 0.0, 1.0) == (None, "")


def test_holm_adjusted_p_values():
    got = power.holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06]) and got[4] == pytest.approx(0.02) and math.isnan(got[3])
    assert power.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


# ---------------------------------------------------------------- gains

CLAIM = [
    dict(
        id="t2-cbn",
        table=2,
        description="+CBN over Baseline",
        method="baseline+cbn",
        over="baseline",
        backbone="resnet32",
        cells=[dict(dataset="cifar100", ratio=100)],
    )
]
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
    runs = pd.concat(
        [
            runs_of({"baseline+cbn": A, "baseline": B}, metric="top1"),
            runs_of({"baseline+cbn": {0: 30.0, 1: 31.0}, "baseline": {0: 28.0, 1: 28.5}}, metric="few"),
            runs_of({"baseline+cbn": {0: 99.0, 1: 99.0}}, metric="few", backbone="resnet56"),
        ]
    )
    g = gains(runs, claim).iloc[0]
    assert g["metric"] == "few" and g["gain"] == pytest.approx(30.5 - 28.25) and g["n_method"] == 2


def test_gains_from_paper_id_cover_every_claim_cell():
    g = gains(runs_of({"baseline": B}), "cbn2022")
    assert len(g) == 5 * 6 + 6 and g.paper_gain.notna().all()
    t3 = g[g.claim == "t3-cbn-dt-rw-rs"].iloc[0]
    assert t3["paper_gain"] == pytest.approx(52.86 - 50.66)


def test_judged_gains_holm_no_gain_and_seeds():
    claims = [
        dict(
            id=f"c{k}",
            table=2,
            description="",
            method=m,
            over="baseline",
            backbone="resnet32",
            cells=[dict(dataset="cifar100", ratio=100)],
        )
        for k, m in enumerate(("big", "zero", "small"))
    ]
    runs = pd.concat(
        [
            runs_of({"baseline": B}),
            runs_of({"big": {s: v + 3.0 + 0.1 * s for s, v in B.items()}}),  # +3, tight pairs
            runs_of({"zero": {s: v + 0.05 * (s - 1) for s, v in B.items()}}),  # ~0, tight pairs
            runs_of({"small": {s: v + 0.6 + 0.4 * (s - 1) for s, v in B.items()}}),
        ]
    )
    g = judge_gains(gains(runs, claims), [1, 1, 1], margin=1.0).set_index("method")
    p = g["paired_p"]
    assert g["p_holm"].tolist() == pytest.approx(power.holm(p.tolist()))
    assert g.loc["big", "p_holm"] == pytest.approx(3 * p["big"]) and g.loc["big", "gain_verdict"] == "supported"
    assert g.loc["zero", "gain_verdict"] == "no gain" and g.loc["zero", "equiv_p"] < 0.05
    assert -1 < g.loc["zero", "equiv_low"] < g.loc["zero", "equiv_high"] < 1
    small = g.loc["small"]  # gain 0.6 ± 0.4: neither significant nor inside ± 1 at 90 %
    assert small["gain_verdict"] == "not significant" and small["seeds_test"] == "TOST"
    n = small["seeds_needed"]
    assert power.equivalence_power(0.6, 0.4, 1.0, n) >= 0.8 > power.equivalence_power(0.6, 0.4, 1.0, n - 1)
    assert g.loc["big", "test"] == "paired t" and pd.isna(g.loc["big", "seeds_needed"])


def test_margin_from_config_and_per_experiment():
    from conftest import ROOT

    from ltbench.analysis.compare import margin_of
    from ltbench.spec import config

    cfg = config.load(ROOT / "config" / "demo.yaml")
    assert cfg["margin"] == 1.0 and margin_of(cfg["experiments"]["table2"], cfg) == 1.0
    raw = {
        "margin": 0.5,
        "experiments": {
            "a": {
                "datasets": ["digits-lt"],
                "ratios": [10],
                "methods": ["ce"],
                "backbones": ["resnet8"],
                "margin": 2.0,
            },
            "b": {"datasets": ["digits-lt"], "ratios": [10], "methods": ["ce"], "backbones": ["resnet8"]},
        },
    }
    cfg = config.validate(raw)
    assert margin_of(cfg["experiments"]["a"], cfg) == 2.0 and margin_of(cfg["experiments"]["b"], cfg) == 0.5
    with pytest.raises(Exception, match="margin"):
        config.validate({**raw, "margin": 0})
