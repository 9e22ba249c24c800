"""Reference data files: schema validation, error messages, and the transcribed numbers."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ltbench.analysis import reference
from ltbench.analysis.reference import ReferenceFileError, entries, load, papers
from ltbench.spec import references

CIFAR_COLS = [("cifar10", 100), ("cifar10", 50), ("cifar10", 10), ("cifar100", 100), ("cifar100", 50), ("cifar100", 10)]
CBN = "baseline+cbn+sbn+dpl"
PAPER_MD = Path("/work/shared/papers/cbn-2022.md")  # the project's transcription notes (optional here)


@pytest.fixture(scope="module")
def cbn() -> pd.DataFrame:
    return entries("cbn2022")


def cell(df, table, method, dataset, ratio, metric="top1"):
    sel = df[
        (df.table == table)
        & (df.method == method)
        & (df.dataset == dataset)
        & (df.ratio == ratio)
        & (df.metric == metric)
    ]
    assert len(sel) == 1, (table, method, dataset, ratio, metric, len(sel))
    return sel.iloc[0]


# ---------------------------------------------------------------- packaged files


def test_papers_lists_both_files():
    assert papers() == ["bsoftmax2020", "cbn2022", "ldamdrw2019", "nbn2025"]


def test_load_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # importlib.resources, not a cwd-relative path
    assert load("cbn2022")["metadata"]["arxiv"] == "2212.01007"


def test_unknown_paper_is_a_key_error_listing_known_ones():
    with pytest.raises(KeyError, match="cbn2022"):
        load("cbn2021")


def test_entries_columns_and_types(cbn):
    assert list(cbn.columns) == reference.ENTRY_COLUMNS
    assert cbn["value"].dtype == "float64" and cbn["ratio"].dtype == "int64" and cbn["quoted"].dtype == bool
    assert (cbn.paper == "cbn2022").all()


def test_metadata():
    md = load("cbn2022")["metadata"]
    assert md["title"] == "Compound Batch Normalization for Long-tailed Image Classification"
    assert md["venue"] == "ACM Multimedia 2022" and md["url"] == "https://arxiv.org/abs/2212.01007"
    assert md["authors"][0] == "Cheng"


# ---------------------------------------------------------------- CBN numbers


def test_entry_counts_per_table(cbn):
    assert cbn.groupby("table").size().to_dict() == {2: 30, 3: 32, 4: 66, 5: 8, 6: 6, 7: 12}
    # Table 4's '–' cells are null entries: LADE 3, ACE 2, DRO-LT 3, PaCo 3, DiVE 3, SSD 3, VS 4.
    assert cbn.value.isna().sum() == 21 and cbn[cbn.value.isna()].table.eq(4).all()


def test_table2_spot_checks(cbn):
    assert cell(cbn, 2, "baseline", "cifar10", 100).value == 81.87
    assert cell(cbn, 2, "baseline+sbn", "cifar10", 10).value == 88.89
    assert cell(cbn, 2, "baseline+cbn", "cifar100", 50).value == 57.26
    assert cell(cbn, 2, "baseline+cbn+sbn", "cifar100", 100).value == 52.76
    assert cell(cbn, 2, CBN, "cifar10", 50).value == 88.70
    assert cell(cbn, 2, CBN, "cifar100", 10).value == 65.35
    t2 = cbn[cbn.table == 2]
    assert set(t2.metric) == {"top1"} and set(t2.backbone) == {"resnet32"} and not t2.quoted.any()
    assert set(zip(t2.dataset, t2.ratio, strict=True)) == set(CIFAR_COLS)


def test_table3_rows_and_spot_checks(cbn):
    t3 = cbn[cbn.table == 3]
    rows = dict(zip(t3.row, t3.method, strict=True))
    assert rows == {
        "I": "baseline",
        "II": "baseline+dt+rs",
        "III": "baseline+dt+rw",
        "IV": "baseline+dt+rw+rs",
        "V": "baseline+cbn",
        "VI": "baseline+cbn+dt+rs",
        "VII": "baseline+cbn+dt+rw",
        "VIII": "baseline+cbn+dt+rw+rs",
    }
    assert t3.groupby("row").size().eq(4).all() and set(t3.metric) == {"top1", "many", "medium", "few"}
    assert set(zip(t3.dataset, t3.ratio, strict=True)) == {("cifar100", 100)}
    assert cell(cbn, 3, "baseline", "cifar100", 100, "top1").value == 49.66
    assert cell(cbn, 3, "baseline+dt+rw+rs", "cifar100", 100, "few").value == 37.07
    assert cell(cbn, 3, "baseline+cbn+dt+rs", "cifar100", 100, "many").value == 70.32
    assert cell(cbn, 3, "baseline+cbn+dt+rw", "cifar100", 100, "medium").value == 55.58
    assert cell(cbn, 3, "baseline+cbn+dt+rw+rs", "cifar100", 100, "few").value == 31.67


def test_table4_quoted_rows_nulls_and_inconsistency(cbn):
    t4 = cbn[cbn.table == 4]
    assert set(t4.method) == {"mislas", "lade", "ace", "dro-lt", "paco", "dive", "ssd", "ib+focal", "vs", "tcm", CBN}
    assert (t4.quoted == (t4.method != CBN)).all()
    assert cell(cbn, 4, "mislas", "cifar10", 100).value == 82.1
    assert cell(cbn, 4, "ib+focal", "cifar100", 10).value == 59.5
    assert cell(cbn, 4, "tcm", "cifar10", 50).value == 84.3
    assert math.isnan(cell(cbn, 4, "vs", "cifar10", 50).value)
    assert math.isnan(cell(cbn, 4, "ace", "cifar100", 10).value)
    assert cell(cbn, 4, "vs", "cifar100", 100).value == 43.5
    incons = cell(cbn, 4, CBN, "cifar100", 50)
    assert incons.value == 60.0 and "58.13" in incons.note and not incons.quoted
    assert cell(cbn, 2, CBN, "cifar100", 50).value == 58.13


def test_tables5_to_7(cbn):
    assert cell(cbn, 5, CBN, "imagenet-lt", 256).value == 57.4
    assert cell(cbn, 5, "paco", "imagenet-lt", 256).value == 57.0
    assert cell(cbn, 5, "disalign", "imagenet-lt", 256).value == 52.9
    assert cell(cbn, 6, "gistnet", "places-lt", 996).value == 39.6
    assert cell(cbn, 6, CBN, "places-lt", 996).value == 42.7
    assert cell(cbn, 7, "ib+focal", "inat2018", 500).value == 65.4
    assert cell(cbn, 7, CBN, "inat2018", 500).value == 74.8
    for table, backbone in [(5, "resnet50"), (6, "resnet152"), (7, "resnet50")]:
        t = cbn[cbn.table == table]
        assert set(t.backbone) == {backbone} and (t.quoted == (t.method != CBN)).all()
    assert cbn[cbn.table == 7].note.str.contains("does not name").all()  # iNat backbone is our assumption


def _md_tables(text: str) -> dict:
    """Parse cbn-2022.md's Tables 2–7 into {(table, method, dataset, ratio, metric): value or None}."""
    out = {}

    def name(s):
        return "baseline+cbn+sbn+dpl" if s.startswith("CBN") else s.lower().replace(" ", "")

    def num(s):
        return None if s.strip() in ("–", "-") else float(s)

    t3_methods = dict(
        I="baseline",
        II="baseline+dt+rs",
        III="baseline+dt+rw",
        IV="baseline+dt+rw+rs",
        V="baseline+cbn",
        VI="baseline+cbn+dt+rs",
        VII="baseline+cbn+dt+rw",
        VIII="baseline+cbn+dt+rw+rs",
    )
    for table in (2, 3, 4):
        block = text.split(f"Table {table} —")[1].split("\n\n")[0]
        for line in block.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or cells[0] in ("row", "exp", "method") or set(cells[0]) <= {"-"}:
                continue
            if table == 3:
                for metric, v in zip(["top1", "many", "medium", "few"], cells[5:9], strict=True):
                    out[(3, t3_methods[cells[0]], "cifar100", 100, metric)] = num(v)
            else:
                for (d, r), v in zip(CIFAR_COLS, cells[1:7], strict=True):
                    out[(table, name(cells[0]), d, r, "top1")] = num(v)
    for table, d, r in [(5, "imagenet-lt", 256), (6, "places-lt", 996), (7, "inat2018", 500)]:
        line = re.search(rf"Table {table} — [^:]*:(.*?)\.\n", text, re.S).group(1)
        for m, v in re.findall(r"([A-Za-z+\-]+) ([0-9.]+)", line):
            out[(table, name(m), d, r, "top1")] = float(v)
    return out


@pytest.mark.skipif(not PAPER_MD.exists(), reason="paper notes not available outside the project workspace")
def test_every_number_matches_the_paper_notes(cbn):
    expected = _md_tables(PAPER_MD.read_text(encoding="utf-8"))
    got = {
        (r.table, r.method, r.dataset, r.ratio, r.metric): (None if pd.isna(r.value) else r.value)
        for r in cbn.itertuples()
    }
    assert len(expected) == 154
    assert got == expected


# ---------------------------------------------------------------- claims


def test_claims_and_qualitative_claims():
    data = load("cbn2022")
    claims = {c["id"]: c for c in data["claims"]}
    assert {"t2-sbn", "t2-cbn", "t2-cbn-sbn", "t2-dpl", "t2-full", "t3-cbn"} <= set(claims)
    assert (claims["t2-dpl"]["method"], claims["t2-dpl"]["over"]) == (CBN, "baseline+cbn+sbn")
    assert (claims["t2-cbn-sbn"]["method"], claims["t2-cbn-sbn"]["over"]) == ("baseline+cbn+sbn", "baseline+cbn")
    assert len(claims["t2-cbn"]["cells"]) == 6
    qual = {q["id"]: q["claim"] for q in data["qualitative_claims"]}
    assert qual["fig5-components"] == "M>1 beats M=1; no gain beyond M=4"
    assert qual["fig6-depth"] == "CBN better than BN at every depth"


def test_claimed_gains_reproduce_table2_brackets():
    """The paper prints each Table 2 row's gain over Baseline in brackets; derived gains must match."""
    from ltbench.analysis.gains import gains

    empty = pd.DataFrame(columns=["dataset", "ratio", "method", "backbone", "seed", "metric", "value"])
    g = gains(empty, "cbn2022").set_index(["claim", "dataset", "ratio"])["paper_gain"].round(2)
    assert g[("t2-cbn", "cifar10", 100)] == 2.25
    assert g[("t2-cbn", "cifar100", 50)] == 5.08
    assert g[("t2-sbn", "cifar10", 50)] == 0.08
    assert g[("t2-full", "cifar100", 50)] == 5.95
    assert g[("t2-full", "cifar10", 10)] == 3.48
    assert g[("t2-dpl", "cifar100", 100)] == 0.55
    assert g[("t3-rw-many", "cifar100", 100)] == -4.44


# ---------------------------------------------------------------- NBN


def test_nbn_entries_are_null_and_not_reported():
    nbn = entries("nbn2025")
    assert len(nbn) == 14 and nbn.value.isna().all() and set(nbn.method) == {"nbn", "ce"}
    assert set(zip(nbn.dataset, nbn.ratio, strict=True)) == set(CIFAR_COLS) | {("imagenet-lt", 256)}
    assert set(nbn[nbn.dataset == "imagenet-lt"].backbone) == {"resnet50"}
    md = load("nbn2025")["metadata"]
    assert md["arxiv"] == "2501.03122" and md["code"] == "https://github.com/yuxiangbao/NBN"


def test_user_filled_nbn_file_loads_by_path(tmp_path):
    data = load("nbn2025")
    data["entries"][0]["value"] = 71.5
    data["entries"][0]["table"] = 2
    path = tmp_path / "nbn-filled.yaml"
    path.write_text(yaml.safe_dump(data))
    df = entries(path)
    assert df.value.iloc[0] == 71.5 and df.table.iloc[0] == 2 and df.value.iloc[1:].isna().all()


# ---------------------------------------------------------------- malformed files


def _write(tmp_path, data, name="broken.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def good():
    return load("cbn2022")


def test_missing_key_names_file_entry_and_key(tmp_path, good):
    del good["entries"][5]["metric"]
    path = _write(tmp_path, good)
    with pytest.raises(ReferenceFileError) as exc:
        load(path)
    msg = str(exc.value)
    assert "broken.yaml" in msg and "entries[5]" in msg and "'metric' is a required property" in msg
    assert "method='baseline'" in msg  # the entry is identified by its content, too


def test_wrong_type_names_file_entry_and_key(tmp_path, good):
    good["entries"][3]["value"] = "81.87"
    with pytest.raises(ReferenceFileError, match=r"broken\.yaml.*\n.*entries\[3\]\.value.*'81\.87' is not of type"):
        load(_write(tmp_path, good))


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["entries"][0].update(vlaue=1.0), r"entries\[0\].*'vlaue' was unexpected"),
        (lambda d: d["entries"][1].update(dataset="cifar-10"), r"entries\[1\]\.dataset.*'cifar-10' is not one of"),
        (lambda d: d["entries"][2].update(quoted="no"), r"entries\[2\]\.quoted.*is not of type 'boolean'"),
        (lambda d: d["entries"][2].update(value=181.0), r"entries\[2\]\.value.*greater than the maximum"),
        (lambda d: d["entries"][4].update(method="Baseline"), r"entries\[4\]\.method.*does not match"),
        (lambda d: d["metadata"].pop("arxiv"), r"metadata.*'arxiv' is a required property"),
        (lambda d: d["entries"].append(dict(d["entries"][0])), r"entries\[154\].*duplicates entries\[0\]"),
        (lambda d: d["claims"][0].update(over="baseline+xyz"), r"claims\[0\].*no entry for method 'baseline\+xyz'"),
    ],
)
def test_other_malformations_are_rejected(tmp_path, good, mutate, expected):
    mutate(good)
    with pytest.raises(ReferenceFileError, match=r"broken\.yaml(.|\n)*" + expected):
        load(_write(tmp_path, good))


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "syntax.yaml"
    path.write_text("paper: x\nentries: [ {table: 2\n")
    with pytest.raises(ReferenceFileError, match=r"syntax\.yaml: not valid YAML"):
        load(path)


def test_packaged_file_must_carry_its_own_id(good, monkeypatch):
    good["paper"] = "nbn2025"
    monkeypatch.setattr(references, "_read", lambda paper: ("cbn2022.yaml", yaml.safe_dump(good)))  # load()'s home
    with pytest.raises(ReferenceFileError, match="'paper' is 'nbn2025', expected 'cbn2022'"):
        load("cbn2022")


def test_a_file_is_parsed_once_per_content_and_each_load_is_its_own_copy(good, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(good))
    first = load(path)
    first["entries"].clear()  # a caller's change stays with the caller
    assert load(path) == good
    good["entries"][0]["value"] = 12.5  # an edited file is read again
    path.write_text(yaml.safe_dump(good))
    assert load(path)["entries"][0]["value"] == 12.5
