"""The HTML report read in a real browser: headless Chromium driven by Selenium through chromedriver.

Selenium, not Playwright: Debian packages the browser and its driver at the same version (``chromium``,
``chromium-driver``), so `.ci/run` installs both with apt and nothing is downloaded at test time, whereas
Playwright fetches its own browser builds from a CDN (or needs one patched to the system browser).
Selenium's W3C WebDriver API is all these tests use, plus one Chrome DevTools command through it (the
1280 × 800 viewport).

Checked on a fixture report (synthetic runs) and on the committed Fashion reports: no console error,
exception or failed load; at 1280 × 800 the first screen shows the findings table with every decided
verdict and its numbers; no element is wider than the viewport or hidden in a horizontal scroll box;
every figure is loaded; the findings table's rows and verdicts are ``findings.csv``'s.
Skips, saying why, where selenium, chromium or chromedriver is not installed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import synthetic
from conftest import ROOT

from ltbench.analysis import aggregate
from ltbench.analysis import findings as findings_mod
from ltbench.report import page as report
from ltbench.spec import config

WIDTH, HEIGHT = 1280, 800
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
COMMITTED = {
    "fashion": "config/fashion.yaml",
    "fashion-cbn": "config/fashion-cbn.yaml",
    "fashion-scale": "config/fashion-scale.yaml",
}

# Everything the tests read from a loaded page, in one script: the viewport, what is wider than it or
# scrolls sideways, the images, and every row of the findings tables (hidden ones included).
FACTS_JS = """
const vw = document.documentElement.clientWidth, out = {vw: vw, vh: window.innerHeight, wide: [],
  pageWidth: document.documentElement.scrollWidth, title: document.title};
for (const el of document.querySelectorAll('body *')) {
  const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
  const name = el.tagName.toLowerCase() + (el.className ? '.' + el.className : '');
  if ((r.width || r.height) && (r.right > vw + 0.5 || r.left < -0.5)) out.wide.push(name + ' ' + Math.round(r.right));
  if (['auto', 'scroll'].includes(cs.overflowX) && el.scrollWidth > el.clientWidth + 1)
    out.wide.push('horizontal scroll box ' + name);
}
out.images = document.images.length;
out.broken = Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
out.rows = Array.from(document.querySelectorAll('table.findings tbody tr')).map(tr => ({
  experiment: tr.dataset.experiment, id: tr.dataset.id, verdict: tr.dataset.verdict,
  label: tr.querySelector('.label').textContent, text: tr.textContent,
  shown: tr.offsetParent !== null, bottom: tr.getBoundingClientRect().bottom}));
return out;
"""


def _binary(env: str, names: tuple[str, ...]) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if shutil.which(os.environ[env]) or Path(os.environ[env]).exists() else None
    return next((p for n in names if (p := shutil.which(n))), None)


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service  # only with selenium installed

    browser = _binary("LTBENCH_CHROMIUM", BROWSERS)
    chromedriver = _binary("LTBENCH_CHROMEDRIVER", ("chromedriver",))
    if browser is None or chromedriver is None:
        pytest.skip(
            "chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver); "
            "the report is not checked in a browser"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, exceptions, failed loads
    d = webdriver.Chrome(options=opts, service=Service(chromedriver))
    d.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )
    yield d
    d.quit()


def load(driver, page: Path) -> tuple[dict, list[str]]:
    """(FACTS_JS's facts, the errors the browser logged) of ``page`` opened at the top of a 1280 × 800 viewport."""
    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(Path(page).resolve().as_uri())
    facts = driver.execute_script(FACTS_JS)
    errors = [f"{e['source']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return facts, errors


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """The first screen as PNG, in ``tmp_path`` and in $LTBENCH_SCREENSHOTS when set (to look at)."""
    png = driver.get_screenshot_as_png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for d in filter(None, (tmp_path, os.environ.get("LTBENCH_SCREENSHOTS"))):
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / f"{name}.png").write_bytes(png)
    return tmp_path / f"{name}.png"


def check_report(driver, page: Path, findings: pd.DataFrame) -> dict:
    """Every check of the module docstring on one report; returns the facts."""
    facts, errors = load(driver, page)
    assert errors == []
    assert (facts["vw"], facts["vh"]) == (WIDTH, HEIGHT)
    assert facts["wide"] == [] and facts["pageWidth"] <= WIDTH
    assert facts["images"] > 0 and facts["broken"] == []
    rows = facts["rows"]
    csv_rows = [(r.experiment, "" if pd.isna(r.id) else r.id, r.verdict) for r in findings.itertuples()]
    assert [(r["experiment"], r["id"], r["verdict"]) for r in rows] == csv_rows
    assert [r["label"] for r in rows] == list(findings["verdict"])
    for r, f in zip(rows, findings.itertuples(), strict=True):
        if f.decided:  # on the first screen, without scrolling, with its numbers
            assert r["shown"] and r["bottom"] <= HEIGHT, (f.claim, r["bottom"])
            assert f"{abs(f.ours):.2f}" in r["text"] and f.claim in r["text"]
    return facts


def test_the_check_sees_console_errors_exceptions_and_failed_loads(driver, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><title>x</title><img src='missing.png'>"
        "<script>console.error('boom'); undefinedFunction();</script>"
    )
    _, errors = load(driver, page)
    assert any("boom" in e for e in errors)
    assert any("undefinedFunction" in e for e in errors)
    assert any("missing.png" in e for e in errors)


def test_the_check_sees_wide_elements_and_horizontal_scroll_boxes(driver, tmp_path):
    page = tmp_path / "wide.html"
    page.write_text(
        "<!doctype html><title>x</title><table class='t'><tr><td style='min-width:1500px'>x</td></tr></table>"
        "<div class='s' style='overflow-x:auto;width:300px'><div style='width:900px'>y</div></div>"
    )
    facts, _ = load(driver, page)
    assert any(w.startswith("table.t") for w in facts["wide"])
    assert "horizontal scroll box div.s" in facts["wide"]


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    """The demo config's demo and table2 experiments with synthetic metrics (3 seeds), aggregated and reported."""
    tmp = tmp_path_factory.mktemp("browser")
    cfg = config.load(
        ROOT / "config" / "demo.yaml", {"results_dir": str(tmp / "results"), "reports_dir": str(tmp / "reports")}
    )
    keep = {n: {**e, "seeds": [0, 1, 2], "ratios": e["ratios"][:1]} for n, e in cfg["experiments"].items()}
    cfg["experiments"] = {n: keep[n] for n in ("demo", "table2")}
    one_run = [("digits-lt", "10", "baseline+cbn+sbn+dpl", "resnet8", s) for s in (1, 2)]  # its claim: untested
    synthetic.write_grid(cfg, offset=lambda c, m: -3.0 if c.method == "nbn" else 0.0, skip=one_run)
    agg = tmp / "results" / "aggregate"
    aggregate.main([], agg, cfg, existing=True)
    out = tmp / "reports" / "demo.html"
    report.main(agg, out, cfg, figures_dir=str(tmp / "fig"), tables_dir=str(tmp / "tab"))
    return out, pd.read_csv(agg / "findings.csv", dtype={"ratio": str})


def test_fixture_report_first_screen_shows_the_findings(driver, fixture_report, tmp_path):
    page, findings = fixture_report
    assert findings["decided"].any() and not findings["decided"].all()
    facts = check_report(driver, page, findings)
    assert facts["title"] == "ltbench report: demo"
    screenshot(driver, tmp_path, "fixture")


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_report_first_screen_shows_every_decided_verdict(driver, name, tmp_path):
    page, agg = ROOT / "reports" / f"{name}.html", ROOT / "reports" / name / "aggregate"
    findings = pd.read_csv(agg / "findings.csv", dtype={"ratio": str})
    # the committed findings.csv is what `ltbench findings` makes of the committed gains and comparison
    rebuilt = findings_mod.findings(
        pd.read_csv(agg / "comparison.csv", dtype={"ratio": str, "table": str, "row": str}),
        pd.read_csv(agg / "gains.csv", dtype={"ratio": str}),
        config.load(ROOT / COMMITTED[name]),
    )
    assert list(rebuilt["verdict"]) == list(findings["verdict"]) and findings["decided"].any()
    check_report(driver, page, findings)
    screenshot(driver, tmp_path, name)
