"""Compiled paths: each path of a menu compiled once, at warm-up, as its own callable.

``torch.compile`` on the switchable model guards on the plan, so every new config recompiles
(DeiT-tiny on CPU: 87 s for the first, 36 s for each further one), and after
``torch._dynamo.config.recompile_limit`` configs (8) Dynamo stops compiling and runs that
frame eagerly, with nothing but a log line to say so. Here each path is a standalone, sliced
module (``slice.path_module``) compiled on its own; all are warmed up front, at batch 1 and at
batch 2 with the batch dimension marked dynamic (one graph for every larger batch), so switching
among warmed paths or batch sizes never compiles again. Inputs are passed to the graphs as
ordinary tensors under inference mode, the kind they were warmed with (Dynamo guards on it).
The recompile limit is raised to what the paths need, and after
warm-up every path runs again and the compile count is checked: a path that would still
recompile, or that fails to compile, is reported with a warning, never run eagerly in silence.

``CompiledPaths`` is model-like for the runner (``runtime.run``), the controller and the server:
``configure(cfg)`` picks the compiled callable, calling it runs it; other attributes (transform,
labels, input size) are the eager model's. A compiled graph cannot consult a deadline between
blocks, so compiled paths carry none (``module.supports_deadline`` is False).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

from dynavit.config import ConfigError, ExecConfig
from dynavit.deploy.slice import DeployError, path_module

log = logging.getLogger(__name__)
WARM_BATCHES = (1, 2)


# ``torch._dynamo`` is reached as an attribute: torch imports it on first use, so ``import dynavit`` does
# not pay for it (seconds) unless something is compiled.


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process so far (all callables together)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _raise_recompile_limit(needed: int) -> None:
    """Each path adds cache entries to the same forward code: the limit must cover them all."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, needed)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * needed)


def _as_config(cfg: ExecConfig | dict | None) -> ExecConfig:
    if cfg is None:
        return ExecConfig()
    return cfg if isinstance(cfg, ExecConfig) else ExecConfig.from_dict(cfg)


class CompiledPaths:
    """Warmed compiled paths of one model; ``configure`` + call, like the model (see the module docstring)."""

    def __init__(self, dm: Any, configs: Iterable[ExecConfig | dict] | None = None, *,
                 backend: str | Callable = "inductor", mode: str | None = None,
                 warm_batches: tuple[int, ...] = WARM_BATCHES, sliced: bool = True) -> None:
        self.dm = dm
        self.module = types.SimpleNamespace(supports_deadline=False, deadline=None)  # compiled graphs: no deadline
        self.backend, self.mode, self.warm_batches, self.sliced = backend, mode, tuple(warm_batches), sliced
        self.paths: dict[ExecConfig, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.failed: dict[ExecConfig, str] = {}  # path -> why it runs eagerly (warned when it happened)
        self.recompiled: list[ExecConfig] = []  # warmed paths that compiled again when run once more
        cfgs = list(dict.fromkeys(_as_config(c) for c in (configs if configs is not None else [dm.exec_config])))
        if not cfgs:
            raise ConfigError("compile needs at least one config")
        self._config = cfgs[0]
        for cfg in cfgs:
            self.add(cfg)
        self.check()

    def __getattr__(self, name: str) -> Any:  # only for names not found: the eager model's (transform, labels, ...)
        if name == "dm":
            raise AttributeError(name)
        return getattr(self.dm, name)

    @property
    def exec_config(self) -> ExecConfig:
        return self._config

    def add(self, cfg: ExecConfig) -> None:
        """Compile ``cfg`` as its own callable and warm it up at every warm-up batch size."""
        _raise_recompile_limit(len(self.warm_batches) * (len(self.paths) + 1) + 8)
        try:
            module = path_module(self.dm, cfg, sliced=self.sliced)
        except DeployError as e:  # data-dependent shapes: every new shape would compile again
            self._eager(cfg, path_module(self.dm, cfg, sliced=self.sliced, check=False), str(e))
            return
        fn = torch.compile(module, backend=self.backend, mode=self.mode)
        try:
            for b in self.warm_batches:
                self._run(fn, self._example(b))
        except Exception as e:  # a compiler failure: loud, and the path still runs
            self._eager(cfg, module, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return
        self.paths[cfg] = fn

    def _example(self, batch: int) -> torch.Tensor:
        """A warm-up input; past batch 1 its batch dimension is marked dynamic, so one graph serves every size."""
        with torch.inference_mode(False):  # an ordinary tensor, as callers pass (see ``__call__``)
            x = self.dm.example_input(batch)
        if batch > 1:
            torch._dynamo.mark_dynamic(x, 0)
        return x

    def _eager(self, cfg: ExecConfig, module: torch.nn.Module, why: str) -> None:
        self.failed[cfg] = why
        self.paths[cfg] = module
        log.warning("path %r is NOT compiled and runs eagerly: %s", cfg, why)

    def check(self) -> list[ExecConfig]:
        """Run every warmed path again at every warm-up batch size; the ones that compiled again are reported."""
        self.recompiled = []
        for cfg, fn in self.paths.items():
            before = compile_count()
            for b in self.warm_batches:
                self._run(fn, self._example(b))
            if compile_count() != before:
                self.recompiled.append(cfg)
                log.warning("compiled path %r compiled again after warm-up: switching to it will recompile", cfg)
        return self.recompiled

    def configure(self, cfg: ExecConfig | dict | None = None, **changes: Any) -> CompiledPaths:
        """Switch to a warmed path (a path not warmed is compiled now, with a warning: that takes a while)."""
        cfg = _as_config(cfg).replace(**changes) if changes else _as_config(cfg)
        self.dm.configure(cfg)  # validates; the eager model follows, for whatever reads it
        if cfg not in self.paths:
            log.warning("path %r was not compiled at warm-up: compiling it now", cfg)
            self.add(cfg)
        self._config = cfg
        return self

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._run(self.paths[self._config], pixel_values)

    @staticmethod
    def _run(fn: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.is_inference():  # Dynamo guards on the kind of tensor: one kind, one graph
            with torch.inference_mode(False):
                pixel_values = pixel_values.clone()
        with torch.inference_mode():  # the mode every path was warmed in: no guard fails on it
            return fn(pixel_values)


def compile_paths(dm: Any, configs: Iterable[ExecConfig | dict] | None = None, **options: Any) -> CompiledPaths:
    """``CompiledPaths`` of ``dm`` for ``configs`` (default: its current path); ``options``: backend, mode, ..."""
    return CompiledPaths(dm, configs, **options)
