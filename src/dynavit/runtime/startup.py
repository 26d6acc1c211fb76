"""Run time as deployed, in one call: the menu loaded as measured, re-timed here, its rescues measured.

``serve``, ``simulate`` and the demo start the same way: the store's model exactly as its sweep
measured it (``Menu.from_store``), the candidate paths timed on this machine now (latency belongs
to the deployment, not to the sweep), and, for a calibrated ViT, what dropping blocks under a
deadline costs each path. ``start`` is that sequence.

The images that choose are kept apart from the images that score. When the sweep's images are
loaded they are split in two (``stats.split_images``): the menu's qualities and the rescue ladders
are measured on one part (``menu_data``), and ``frames`` are the other part, or the images of
another folder. A choice scored on the images that made it looks better than it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dynavit.data import open_dataset
from dynavit.deploy.compiled import compile_paths
from dynavit.deploy.onnxrt import OnnxPaths
from dynavit.errors import DynavitError
from dynavit.model import DynamicModel
from dynavit.runtime.controller import Controller
from dynavit.runtime.menu import Menu
from dynavit.runtime.simulate import path_quality
from dynavit.runtime.timing import PROFILE_IMAGES
from dynavit.sweep import stats
from dynavit.sweep.engine import CachedData, cache_dataset
from dynavit.sweep.store import ResultStore

RUNTIMES = ("torch", "onnxruntime")
log = logging.getLogger(__name__)


@dataclass
class Started:
    """What ``start`` built: the controller (its ``model`` is the menu's), and the images when loaded."""

    menu: Menu
    controller: Controller
    data: CachedData | None = None  # the images the menu's qualities and ladders were measured on
    quality_of: Callable[..., float] | None = None  # a path's quality on ``data``, as the sweep measures it
    frames: CachedData | None = None  # images none of the above has seen: a trace's frames
    held_out_of: Callable[..., float] | None = None  # a path's quality on ``frames``
    images: dict[str, Any] = field(default_factory=dict)  # menu_images, frame_images (pixel hashes), overlap

    @property
    def model(self) -> DynamicModel:
        return self.menu.model

    @property
    def memory(self) -> dict[str, dict[str, int]]:
        """Bytes held per loaded model ("base", each variant; ``DynamicModel.memory_held``), {} for exported paths."""
        held = getattr(self.model, "memory_held", None)
        return held() if held is not None else {}


def start(store: str | Path, model: str | DynamicModel | None = None, *, device: str | None = None,
          profile_runs: int = 50, rescue: bool | Literal["auto"] = "auto", images: bool = False,
          frames: str | Path | None = None, menu_share: float = 0.5, seed: int = 0, progress: bool = False,
          runtime: str = "torch", compile: bool | str = False, precisions: Sequence[str] = (),
          **options: Any) -> Started:
    """The store's menu and a controller on it, ready to run.

    ``profile_runs`` > 0 widens the candidates to the fronts by MACs and by stored latency and keeps
    the front by what is measured here (on one of the menu's images when they are loaded);
    ``rescue``: measure the rescue ladders (True: required, "auto": when the model can drop blocks);
    ``images``: load the sweep's images even when no ladder needs them; ``frames``: a folder of
    labelled images to use as frames instead of the sweep's held-out part (then the menu keeps all
    the sweep's images); ``menu_share``: the part of the sweep's images that measures the menu.
    ``options``: ``Controller`` options (``rule``, ``target_miss``, ``margin``, ...). ``runtime="onnxruntime"``:
    ``model`` is a folder ``dynavit export --store`` wrote, run by ONNX Runtime (no store, no rescue);
    ``compile``: every candidate path compiled and warmed before it is timed (no rescue: a compiled graph
    runs whole; a string names the ``torch.compile`` backend, default inductor). ``precisions``: only paths
    measured at these.
    """
    if runtime not in RUNTIMES:
        raise DynavitError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime != "torch" or compile:
        return _start_deployed(store, model, device=device, profile_runs=profile_runs, rescue=rescue, images=images,
                               frames=frames, menu_share=menu_share, seed=seed, progress=progress, runtime=runtime,
                               compile=compile, precisions=precisions, **options)
    if rescue is True and not profile_runs:
        raise DynavitError("rescue needs the menu profiled at start-up (profile runs > 0): a deadline needs "
                           "each block's share of the path's time")
    menu = Menu.from_store(store, model, device=device, wide=profile_runs > 0, precisions=precisions)
    ctrl = Controller(menu, rescue=rescue is not False, **options)
    if rescue is True and not ctrl.can_rescue:
        raise DynavitError(f"{menu.model.source} cannot drop blocks under a deadline: that takes a calibrated ViT")
    ladders = bool(rescue) and profile_runs > 0 and ctrl.can_rescue
    s = Started(menu, ctrl)
    if images or ladders or frames is not None:
        _split(s, store, frames, menu_share, seed, progress, wide=profile_runs > 0, precisions=precisions)
        ctrl = s.controller = Controller(menu, rescue=rescue is not False, **options)  # on the menu's qualities
    if profile_runs:
        ctrl.profile(_probe(s), runs=profile_runs, progress=progress)
    if ladders:
        ctrl.measure_rescue(s.quality_of, progress=progress)
    log.info("memory held: %s", ", ".join(f"{k} {v['total'] / 2**20:.1f} MiB" for k, v in s.memory.items()))
    return s


def _split(s: Started, store: str | Path, frames: str | Path | None, share: float, seed: int,
           progress: bool, *, wide: bool, precisions: Sequence[str]) -> None:
    """Load the images, split them into menu and frame images, and choose the menu again on its part.

    The entries are re-read from the store on the menu's images (``Menu.read(images=...)``): which
    paths are on the menu is a choice too, and the frame images must take no part in it."""
    data = s.menu.images(progress=progress)
    per_image = _per_image(store)
    if any(len(p) != data.n for p in per_image.values()):
        raise DynavitError(f"{store}'s rows were scored on other images than the {data.n} its sweep names now")
    if frames is None:
        menu_idx, frame_idx = stats.split_images(data.n, seed, share)
        s.data, s.frames = data.subset(menu_idx), data.subset(frame_idx)
        s.menu.entries = Menu.read(store, wide=wide, precisions=precisions, images=menu_idx).entries
    else:  # frames from another folder: the menu keeps all the sweep's images, as read
        frame_idx = None
        s.data = data
        s.frames = cache_dataset(s.model, open_dataset(frames), progress=progress)
    task = data.task
    held = {c: stats.point(p[frame_idx], task) for c, p in per_image.items()} if frame_idx is not None else {}
    s.quality_of = path_quality(s.model, s.data)
    s.held_out_of = path_quality(s.model, s.frames, known=held)
    menu_h, frame_h = s.data.pixel_hashes(), s.frames.pixel_hashes()
    s.images = {"menu_images": menu_h, "frame_images": frame_h, "overlap": len(set(menu_h) & set(frame_h))}
    if s.images["overlap"]:
        raise DynavitError(f"{s.images['overlap']} frame images are also menu images: the frames must be unseen")


def _probe(s: Started) -> torch.Tensor:
    """What the start-up profile times on: menu images spread over the part that chose the menu (a
    path that keeps as many tokens as each image lets it takes as long as its image), else one
    random input."""
    if s.data is None:
        return s.menu.model.example_input()
    return torch.cat(s.data.spread(PROFILE_IMAGES))


def _per_image(store: str | Path) -> dict[Any, np.ndarray]:
    with ResultStore(store, readonly=True) as rs:
        return {r.config: r.per_image for r in rs.rows() if r.per_image is not None}


def _start_deployed(store: str | Path, model: Any, *, device: str | None, profile_runs: int,
                    rescue: bool | Literal["auto"], images: bool, frames: str | Path | None, menu_share: float,
                    seed: int, progress: bool, runtime: str, compile: bool | str, precisions: Sequence[str],
                    **options: Any) -> Started:
    """``start`` on exported ONNX files or on compiled paths: the same controller, no deadlines."""
    if rescue is True:
        raise DynavitError(f"{'compiled paths' if compile else runtime} cannot drop blocks under a deadline: "
                           "a graph runs whole (leave rescue off)")
    if runtime == "onnxruntime":
        if compile:
            raise DynavitError("--compile is for the torch runtime; ONNX Runtime optimises its graphs itself")
        if model is None:
            raise DynavitError("the onnxruntime runtime needs the folder `dynavit export --store` wrote as MODEL")
        menu = OnnxPaths(model).menu()
        s = Started(menu, Controller(menu, rescue=False, **options))
    else:
        menu = Menu.from_store(store, model, device=device, wide=profile_runs > 0, precisions=precisions)
        s = Started(menu, Controller(menu, rescue=False, **options))
        if images or frames is not None:  # split and score with the eager model: quality as the sweep measures it
            _split(s, store, frames, menu_share, seed, progress, wide=profile_runs > 0, precisions=precisions)
        backend = {} if compile is True else {"backend": compile}
        menu.model = compile_paths(menu.model, [e.config for e in menu.entries], **backend)
        s.controller = Controller(menu, rescue=False, **options)
    if profile_runs:
        s.controller.profile(_probe(s), runs=profile_runs, progress=progress)
    return s
