# The two commands of the README. Both install what they need first (idempotent).
PYTHON ?= python3
CORES ?= 2

.PHONY: install demo test dryrun clean-demo

install:
	$(PYTHON) -m pip install --quiet -e ".[test,slurm]"

# The whole pipeline on the embedded digits-lt data: data → train → aggregate → report.
demo: install
	$(PYTHON) -m snakemake --cores $(CORES) --configfile config/demo.yaml
	@echo "report: reports/demo.html"

test: install
	$(PYTHON) -m pytest -q

# The paper grid's DAG, without running anything (no data or GPU needed).
dryrun: install
	$(PYTHON) -m snakemake -n --cores 1

clean-demo:
	rm -rf results/demo reports/demo.html
