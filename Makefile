# The two commands of the README. Both install what they need first (idempotent); `make test` runs
# `make lint` (the code-health gates) before the test suite and stops if a gate fails.
#
# Environment: inside an active virtual or conda environment ($VIRTUAL_ENV / $CONDA_PREFIX) the
# targets install into and run from that environment. Otherwise they create `.venv/` in the
# project with $(BASE_PYTHON) -m venv and use it, so a distribution's externally managed
# Python (PEP 668: Debian, Ubuntu) works unchanged. PYTHON=... on the command line overrides both.
BASE_PYTHON ?= python3
CORES ?= 2
VENV ?= .venv

ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON ?= python3
else
PYTHON ?= $(VENV)/bin/python
endif
# Commands run with the environment's bin/ first on PATH (as if activated), so that the rules'
# `python -m ltbench` and `snakemake` are the ones installed here.
RUN = $(if $(findstring /,$(PYTHON)),PATH="$(abspath $(dir $(PYTHON))):$$PATH" )$(PYTHON)

.PHONY: install demo lint test dryrun docs docs-serve clean-demo

$(VENV)/bin/python:
	@$(BASE_PYTHON) -c "import venv, ensurepip" 2>/dev/null || { \
	  echo "error: $(BASE_PYTHON) cannot create a virtual environment (its venv/ensurepip module is missing)." >&2; \
	  echo "       On Debian/Ubuntu: sudo apt-get install python3-venv   (then run make again)" >&2; exit 1; }
	$(BASE_PYTHON) -m venv $(VENV)

install: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	$(PYTHON) -m pip install --quiet -e ".[test,slurm,docs,lint]"

# The whole pipeline on the embedded digits-lt data: data → train → aggregate → report.
demo: install
	$(RUN) -m snakemake --cores $(CORES) --configfile config/demo.yaml
	@echo "report: reports/demo.html"

# The code-health gates (configured in pyproject.toml; the same hooks in .pre-commit-config.yaml): ruff's
# lint rules and formatter over ltbench/ and tests/, mypy over ltbench/, snakefmt and Snakemake's linter
# over the Snakefile and workflow/. Every gate runs; any failure fails the target.
LINT_GATES = "ruff check ltbench tests" "ruff format --check ltbench tests" "mypy" \
	"snakefmt --check Snakefile workflow" "snakemake --lint --dry-run --cores 1"

lint: install
	@status=0; for gate in $(LINT_GATES); do \
	  echo "lint: $$gate"; $(RUN) -m $$gate || status=1; \
	done; \
	[ $$status = 0 ] || echo "lint: a gate failed (see above); README: Contributing" >&2; exit $$status

test: lint
	$(RUN) -m pytest -q

# The paper grid's DAG, without running anything (no data or GPU needed).
dryrun: install
	$(RUN) -m snakemake -n --cores 1

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or page is an error.
# NO_MKDOCS_2_WARNING silences Material's notice about its successor (it changes nothing in the build).
docs: install
	NO_MKDOCS_2_WARNING=1 $(RUN) -m mkdocs build --strict

# The same site on http://127.0.0.1:8000, rebuilt on every change (Ctrl-C stops it).
docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(RUN) -m mkdocs serve

clean-demo:
	rm -rf results/demo reports/demo.html
