"""Run time: the budget controller and trace-driven evaluation."""

from dynavit.runtime.controller import Choice, Controller, Entry, Outcome

__all__ = ["Choice", "Controller", "Entry", "Outcome"]
