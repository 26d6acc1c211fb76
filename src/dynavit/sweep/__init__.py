"""Sweeps: measure many execution paths, store the rows durably, find the Pareto front."""

from dynavit.sweep.pareto import Front, pareto
from dynavit.sweep.run import SweepSummary, SweepTarget, run_sweep
from dynavit.sweep.space import SearchSpace, load_space
from dynavit.sweep.store import ResultStore, Row

__all__ = ["Front", "ResultStore", "Row", "SearchSpace", "SweepSummary", "SweepTarget", "load_space", "pareto",
           "run_sweep"]
