"""Compiled paths: each path compiled once at warm-up; switching among warmed paths never compiles again.

The compiler backend here is Dynamo's ``eager`` backend: the guards, caches and recompile limit
that decide whether a switch recompiles are Dynamo's, whatever backend turns the graph into
code, and inductor would take minutes per path on the test machine's CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from helpers import tiny_vit

from dynavit.config import ExecConfig
from dynavit.deploy.compiled import compile_count

# 16 paths, as many as a served menu holds
PATHS = [ExecConfig(), ExecConfig(mlp_width=0.5), ExecConfig(heads=1, skip_blocks=(1,)),
         ExecConfig(token_keep=0.5, token_layers=(1,)), ExecConfig(mlp_width=0.25, heads=1),
         ExecConfig(mlp_width=0.75), ExecConfig(heads=1), ExecConfig(skip_blocks=(0,)), ExecConfig(skip_blocks=(2,)),
         ExecConfig(skip_attn=(1,)), ExecConfig(skip_mlp=(2,)), ExecConfig(token_keep=0.75, token_layers=(0,)),
         ExecConfig(token_keep=0.5, token_layers=(1,), token_method="merge"),
         ExecConfig(mlp_width=0.5, skip_blocks=(2,)), ExecConfig(heads=1, mlp_width=0.75, skip_attn=(0,)),
         ExecConfig(mlp_width=0.25, token_keep=0.5, token_layers=(2,))]


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    before = torch._dynamo.config.recompile_limit
    torch.set_num_threads(1)
    vit = tiny_vit(layers=3)
    yield vit, vit.compile([*PATHS, ExecConfig(token_threshold=0.9)], backend="eager")
    torch._dynamo.config.recompile_limit = before
    torch._dynamo.reset()


def test_cycling_warmed_paths_never_recompiles(compiled) -> None:
    vit, cp = compiled
    # more paths x batch sizes than Dynamo's default limit of 8 entries per code object
    assert len(cp.paths) * len(cp.warm_batches) > 8 and not cp.recompiled
    assert torch._dynamo.config.recompile_limit >= len(cp.paths) * len(cp.warm_batches)
    warmed = compile_count()
    assert warmed >= len(PATHS) * len(cp.warm_batches)  # each path was compiled, not run eagerly
    for _ in range(2):
        for cfg in reversed(PATHS):
            for batch in (1, 3, 5):
                x = vit.example_input(batch)
                with torch.inference_mode():  # callers pass inference tensors, too
                    out = cp.configure(cfg)(x)
                ref = vit.configure(cfg)(x).detach()
                assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
                assert cp.exec_config == cfg
    assert compile_count() == warmed


def test_a_path_that_cannot_compile_is_reported_and_still_runs(compiled, caplog) -> None:
    vit, cp = compiled
    cfg = ExecConfig(token_threshold=0.9)
    assert "data-dependent" in cp.failed[cfg]
    x = vit.example_input(2)
    assert torch.allclose(cp.configure(cfg)(x), vit.configure(cfg)(x).detach(), atol=1e-5)
    before = compile_count()
    with caplog.at_level(logging.WARNING, logger="dynavit.deploy.compiled"):
        cp.configure(ExecConfig(mlp_width=0.625))  # not warmed: compiled now, and said so
    assert "not compiled at warm-up" in caplog.text and compile_count() > before
    assert cp.module.supports_deadline is False and cp.input_size == vit.input_size  # the rest is the model's
