"""findings.csv (ltbench/analysis/findings.py) and the report's first screen (ltbench/report/headline.py):
one row per claim tested, decided verdicts first, every number the aggregate's."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import synthetic
from conftest import ROOT

from ltbench import cli
from ltbench.analysis import aggregate, findings
from ltbench.errors import ConfigError
from ltbench.report import page as report
from ltbench.spec import config

CELL = {"dataset": "cifar10", "ratio": "100", "backbone": "resnet32", "metric": "top1"}


def _gain(exp, kind, method, verdict, gain, claim=None, **kw):
    return {
        "experiment": exp,
        "kind": kind,
        "claim": claim or f"{method}-over-baseline",
        "table": 2.0 if kind == "claim" else math.nan,
        **CELL,
        "method": method,
        "over": "baseline",
        "n_method": 3,
        "n_over": 3,
        "gain": gain,
        "paper_gain": kw.get("paper_gain", math.nan),
        "welch_ci_low": gain - 1,
        "welch_ci_high": gain + 1,
        "test": "paired t",
        "p_holm": kw.get("p", 0.01),
        "gain_verdict": verdict,
        "seeds_needed": kw.get("seeds_needed"),
    }


def _comp(exp, method, verdict, mean, paper):
    return {
        "experiment": exp,
        "table": "2",
        "row": "None",
        **CELL,
        "method": method,
        "quoted": False,
        "paper_value": paper,
        "mean": mean,
        "ci_low": mean - 0.5,
        "ci_high": mean + 0.5,
        "n": 3,
        "tost_p": 0.2,
        "verdict": verdict,
        "seeds_needed": None,
    }


CFG = {
    "experiments": {
        "a": {"reference": {"paper": "cbn2022", "table": 2}},
        "b": {"figure": "sensitivity"},
    }
}


def test_rows_order_and_numbers_come_from_gains_and_comparison():
    gains = pd.DataFrame(
        [
            _gain("a", "claim", "baseline+cbn", "not significant", 0.4, claim="t2-cbn", p=0.3, seeds_needed=9),
            _gain("a", "claim", "baseline+sbn", "supported", 2.0, claim="t2-sbn", paper_gain=1.5),
            _gain("a", "ablation", "baseline+cbn", "not significant", 0.4),  # the claim's own test: dropped
            _gain("a", "ablation", "baseline+dpl", "contradicted", -3.0),  # no claim: kept
            _gain("b", "sensitivity", "cbn@x", "untested", math.nan, p=math.nan),
            _gain("b", "sensitivity", "cbn@y", "contradicted", -4.0),
        ]
    )
    comparison = pd.DataFrame(
        [
            _comp("a", "baseline", "reproduced", 80.0, 80.2),
            _comp("a", "ce", "not reported", 70.0, math.nan),  # tests nothing: dropped
            _comp("a", "baseline+cbn", "inconclusive", 81.0, 81.5),
        ]
    )
    f = findings.findings(comparison, gains, CFG)
    assert list(zip(f["experiment"], f["kind"], f["method"], f["verdict"], strict=True)) == [
        ("a", "claim", "baseline+sbn", "supported"),  # decided first, experiments in config order, claims first
        ("a", "reproduction", "baseline", "reproduced"),
        ("a", "ablation", "baseline+dpl", "contradicted"),
        ("b", "sensitivity", "cbn@y", "contradicted"),
        ("a", "claim", "baseline+cbn", "not significant"),  # then undecided
        ("a", "reproduction", "baseline+cbn", "inconclusive"),
        ("b", "sensitivity", "cbn@x", "untested"),  # then untested
    ]
    assert list(f["decided"]) == [True] * 4 + [False] * 3
    sbn = f.iloc[0]
    assert (sbn.paper, sbn.ours, sbn.ci_low, sbn.ci_high, sbn.p_value) == (1.5, 2.0, 1.0, 3.0, 0.01)
    assert sbn.claim == "Baseline + SBN over Baseline, CIFAR-10-LT ρ=100, ResNet-32" and sbn.source == "cbn2022 Table 2"
    rep = f.iloc[1]
    assert (rep.quantity, rep.paper, rep.ours, rep.ci_low, rep.test) == ("accuracy", 80.2, 80.0, 79.5, "TOST")
    assert f.iloc[4].seeds_needed == 9 and pd.isna(f.iloc[6].ours)
    assert findings.findings(comparison, gains, None).empty


def _demo(tmp_path, **exp_changes):
    cfg = config.load(
        ROOT / "config" / "demo.yaml",
        {"results_dir": str(tmp_path / "results"), "reports_dir": str(tmp_path / "reports")},
    )
    cfg["experiments"] = {
        "table2": {**cfg["experiments"]["table2"], "seeds": [0, 1, 2], "ratios": [10], **exp_changes},
        "fig6": {**cfg["experiments"]["fig6"], "seeds": [0, 1]},
    }
    synthetic.write_grid(cfg)
    agg = tmp_path / "results" / "aggregate"
    aggregate.main([], agg, cfg, existing=True)
    return cfg, agg


def _render(cfg, agg, tmp_path):
    out = tmp_path / "reports" / "x.html"
    report.main(agg, out, cfg, figures_dir=str(tmp_path / "fig"), tables_dir=str(tmp_path / "tab"))
    return out.read_text()


def test_aggregate_writes_findings_and_the_page_shows_its_rows(tmp_path):
    cfg, agg = _demo(tmp_path)
    f = pd.read_csv(agg / "findings.csv", dtype={"ratio": str})
    gains = pd.read_csv(agg / "gains.csv", dtype={"ratio": str})
    assert len(f) == len(gains[gains.kind == "claim"]) == 2 and set(f.experiment) == {"table2"}
    assert sorted(f.ours) == sorted(gains[gains.kind == "claim"].gain)
    h = _render(cfg, agg, tmp_path)
    first = h[h.index("id='findings'") : h.index("id='summary'")]
    assert re.findall(r"data-verdict='([^']*)'", first) == list(f.verdict)
    assert "<img" in first and (tmp_path / "fig" / "findings.png").exists()
    md = (tmp_path / "tab" / "findings.md").read_text().splitlines()
    assert sum(ln.startswith("| ") for ln in md) == len(f) + 1  # the header and one line per row
    # each experiment's section opens with its finding, before its table
    t2 = h[h.index("id='exp-table2'") :]
    assert t2.index("class='finding'") < t2.index("class='paper-table'")
    fig6 = h[h.index("id='exp-fig6'") :]
    assert "no claim is tested in this experiment (it has no paper reference" in fig6[: fig6.index("paper-table")]
    # the counts matrix keeps the verdicts that occur; nothing scrolls sideways
    summary = h[h.index("id='summary'") : h.index("<nav")]
    heads = re.findall(r"<th>([a-z ]+)</th>", summary)
    assert heads and set(heads) <= set(f.verdict) and "overflow-x:auto" not in h and "class='scroll'" not in h


def test_the_findings_figure_is_a_config_choice(tmp_path):
    cfg, agg = _demo(tmp_path)
    cfg["report"] = {"figures": []}
    h = _render(cfg, agg, tmp_path)
    assert not (tmp_path / "fig" / "findings.png").exists()
    assert "<img" not in h[h.index("id='findings'") : h.index("id='summary'")]


def test_an_aggregate_without_findings_is_an_error_until_ltbench_findings_writes_it(tmp_path, capsys):
    cfg, agg = _demo(tmp_path)
    before = (agg / "findings.csv").read_text()
    (agg / "findings.csv").unlink()
    with pytest.raises(ConfigError, match="ltbench findings --aggregate-dir"):
        _render(cfg, agg, tmp_path)
    assert cli.main(["findings", "--aggregate-dir", str(agg)]) != 0
    assert "needs the workflow config" in capsys.readouterr().err
    assert cli.main(["findings", "--aggregate-dir", str(agg), "--config-json", json.dumps(cfg)]) == 0
    assert (agg / "findings.csv").read_text() == before


def test_a_figure_whose_inputs_are_gone_is_the_earlier_reports_marked(tmp_path):
    cfg, agg = _demo(tmp_path)
    _render(cfg, agg, tmp_path)
    per_class = tmp_path / "fig" / "table2" / "per_class.png"
    assert per_class.exists()
    (agg / "per_class.csv").write_text((agg / "per_class.csv").read_text().splitlines()[0] + "\n")
    h = _render(cfg, agg, tmp_path)
    assert h.count("Drawn by an earlier report from the aggregate&#x27;s per_class.csv") == 2 * 2  # alt + caption
    per_class.unlink()
    h = _render(cfg, agg, tmp_path)
    assert "Drawn by an earlier report" not in h.split("id='exp-fig6'")[0] and "per_class (no finished run)" in h
