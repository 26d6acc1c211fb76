"""A model on a chosen execution path, and configs given as text: what the command line's options name.

``load_configured`` is ``load`` + ``load_calibration`` + ``configure`` in the one order that
works (a calibration reorders the weights the path then slices); ``calibrate_folder`` calibrates
on a folder of images and records which images it saw, so that a sweep on the same folder can
leave them out of its scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dynavit.calibrate import Calibration
from dynavit.config import ExecConfig
from dynavit.data.datasets import file_sha1, list_images, read_image
from dynavit.errors import DynavitError, check_writable
from dynavit.model import DynamicModel, load


def json_text(spec: str) -> str:
    """``spec`` itself, or the contents of the file it names (JSON is given inline or as a file)."""
    if os.path.isfile(spec):  # isfile: a long JSON string is no error
        return Path(spec).read_text()
    if spec.strip().endswith(".json") and not spec.lstrip().startswith(("{", "[")):
        raise DynavitError(f"config file {spec} does not exist")
    return spec


def parse_config(spec: str) -> ExecConfig:
    """An ExecConfig from inline JSON or a .json file."""
    return ExecConfig.from_json(json_text(spec))


def parse_configs(spec: str) -> list[ExecConfig]:
    """A list of ExecConfigs from an inline JSON list or a .json file holding one."""
    try:
        items = json.loads(json_text(spec))
    except json.JSONDecodeError as e:
        raise DynavitError(f"--configs must be a JSON list of configs or a .json file holding one ({e})") from None
    if not isinstance(items, list):
        raise DynavitError("--configs must be a JSON list of configs")
    return [ExecConfig.from_dict(c) for c in items]


def load_configured(model: str, *, config: ExecConfig | str | None = None, calibration: str | Path | None = None,
                    device: str = "cpu", dtype: str = "fp32") -> DynamicModel:
    """Load ``model``, apply ``calibration`` (a ``dynavit calibrate`` folder), then switch to ``config``
    (at precision ``dtype`` unless the config names one)."""
    dm = load(model, device=device, dtype=dtype)
    if config is not None and dtype != "fp32":
        config = parse_config(config) if isinstance(config, str) else config
        config = config if config.precision != "fp32" else config.replace(precision=dtype)
    if config is None and calibration is None:
        return dm
    if not dm.dynamic:
        raise DynavitError(f"{model} ({dm.family}) has no execution paths yet; drop --config/--calibration")
    if calibration is not None:
        dm.load_calibration(calibration)
    if config is not None:
        dm.configure(parse_config(config) if isinstance(config, str) else config)
    return dm


def calibrate_folder(model: str, images: str | Path, out: str | Path, *, criterion: str = "auto",
                     limit: int = 64, compensate: bool = True, progress: bool = False) -> Calibration:
    """Calibrate ``model`` on at most ``limit`` images spread over ``images`` (recursive) and save to ``out``."""
    if limit < 1:
        raise DynavitError(f"calibration needs at least 1 image (limit {limit})")
    check_writable(out, folder=True)  # before minutes of work
    dm = load(model)
    if not dm.dynamic:
        raise DynavitError(f"{model} ({dm.family}) has no execution paths to calibrate yet")
    images = Path(images)
    if not images.is_dir():
        raise DynavitError(f"image folder {images} does not exist")
    paths = list_images(images, recursive=True)
    if not paths:
        raise DynavitError(f"no images found under {images}")
    paths = paths[:: max(1, len(paths) // limit)][:limit]
    cal = dm.calibrate([read_image(p) for p in paths], criterion=criterion, compensate=compensate, progress=progress)
    cal.image_hashes = [file_sha1(p) for p in paths]  # a sweep on the same folder leaves these out
    dm.save_calibration(out)
    return cal


__all__ = ["calibrate_folder", "json_text", "load_configured", "parse_config", "parse_configs"]
