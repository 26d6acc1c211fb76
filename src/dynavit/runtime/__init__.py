"""Run time: the menu a sweep measured, the budget controller, the runner, and trace-driven evaluation."""

from dynavit.runtime.choice import Choice, Options, Outcome
from dynavit.runtime.controller import Controller
from dynavit.runtime.menu import Entry, Menu

__all__ = ["Choice", "Controller", "Entry", "Menu", "Options", "Outcome"]
