"""Sequential seed designs (an experiment's ``seeds: {initial, max, step, spending, alpha}``) and the
grid file that extends them: ``<results_dir>/sequential/<name>.json``, the seeds per cell that the
driver (``ltbench run --until-decided``, :mod:`ltbench.tools.run`) has asked for. The Snakefile reads it
when it builds the grid (through :func:`ltbench.spec.config.validate`), so a plain ``snakemake`` after
the driver sees the same grid. The rule that decides is :mod:`ltbench.analysis.sequential`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from ltbench.errors import ConfigError

SPENDING = ("obrien-fleming", "pocock")
DEFAULT_SPENDING = "obrien-fleming"
DESIGN_KEYS = ("initial", "max", "step", "spending", "alpha")


@dataclass(frozen=True)
class Design:
    """A sequential seed design: looks at ``initial``, ``initial + step``, … seeds and at ``max``;
    ``spending`` the alpha-spending function, ``alpha`` the error rate it keeps."""

    initial: int = 3
    max: int = 10
    step: int = 1
    spending: str = DEFAULT_SPENDING
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.initial < 2:
            raise ValueError(f"seeds.initial must be at least 2 (a t-test needs 2 seeds), got {self.initial}")
        if self.max < self.initial:
            raise ValueError(f"seeds.max ({self.max}) must be at least seeds.initial ({self.initial})")
        if self.step < 1:
            raise ValueError(f"seeds.step must be at least 1, got {self.step}")
        if self.spending not in SPENDING:
            raise ValueError(f"seeds.spending must be one of {', '.join(SPENDING)}, got {self.spending!r}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"seeds.alpha must be in (0, 0.5), got {self.alpha}")

    @classmethod
    def of(cls, m: Mapping) -> Design:
        return cls(**{k: m[k] for k in DESIGN_KEYS if k in m})

    def as_dict(self) -> dict:
        return asdict(self)

    def looks(self) -> list[int]:
        """The planned seed counts: initial, initial + step, …, and max."""
        return [*range(self.initial, self.max, self.step), self.max]

    def fractions(self) -> tuple[float, ...]:
        return tuple(n / self.max for n in self.looks())

    def next_look(self, n: int) -> int:
        """The first planned seed count above ``n`` (``max`` at most)."""
        return next((k for k in self.looks() if k > n), self.max)


def cell_key(dataset: str, ratio: str, method: str, backbone: str) -> str:
    """A cell without its seed, as the grid file names it (``Cell.path`` less ``/s<seed>``)."""
    return f"{dataset}/r{ratio}/{method}/{backbone}"


def state_path(cfg: Mapping) -> Path:
    return Path(cfg["results_dir"]) / "sequential" / f"{cfg['name']}.json"


def read_state(cfg: Mapping) -> dict:
    """The grid file of this config (an empty state when there is none yet)."""
    path = state_path(cfg)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"experiments": {}}
    except (OSError, ValueError) as e:
        raise ConfigError(f"sequential grid file {path}: not readable JSON ({e}); delete it to start again") from None
    if not isinstance(state, dict) or not isinstance(state.get("experiments", {}), dict):
        raise ConfigError(f"sequential grid file {path}: not an ltbench grid file (no 'experiments' mapping)")
    return state


def expand(ename: str, seeds: Mapping, state: Mapping, where: str) -> dict:
    """The validated ``sequential`` entry of an experiment whose ``seeds`` is a design mapping: the
    design and, from the grid file, the seeds each cell has been given (``cells``; a cell not listed
    has ``initial``). Raises :class:`ConfigError` naming the key."""
    try:
        design = Design.of(seeds)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key experiments.{ename}.seeds: {e}") from None
    cells = (state.get("experiments", {}).get(ename) or {}).get("cells", {})
    for key, n in cells.items():
        if isinstance(n, bool) or not isinstance(n, int) or not design.initial <= n <= design.max:
            raise ConfigError(
                f"{where}: experiments.{ename}.cells[{key!r}] = {n!r} is not a seed count in "
                f"[{design.initial}, {design.max}] (seeds of experiments.{ename}); delete the file to start again"
            )
    return {**design.as_dict(), "cells": dict(cells)}


def cell_seeds(exp: Mapping, key: str) -> list[int]:
    """The seeds of one cell (``cell_key``) of an experiment: its fixed list, or 0 … n − 1 of a sequential one."""
    seq = exp.get("sequential")
    if not seq:
        return [int(s) for s in exp["seeds"]]
    return list(range(int(seq["cells"].get(key, seq["initial"]))))
