"""Stage 3, analysis: every metrics.json → tidy tables, per-cell statistics over seeds, verdicts
against the papers' reference numbers and claimed-gain tests. The report renders what this writes."""
