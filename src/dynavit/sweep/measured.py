"""The model as a sweep measured it: loaded the same way, and known by one weights fingerprint.

A store's rows hold only for the weights they were measured on: the source model, reordered by
its calibration, with the multiplexed models (``mux=N`` paths) and variants it carried. The
sweep records ``model_fingerprint(dm)`` in the store; everything that runs a store's paths
later (the menu, the server, the accelerator costing) loads the model with ``load_model`` and
is refused by ``check_measured`` when its fingerprint differs, whatever the model is called.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dynavit.calibrate import fingerprint
from dynavit.errors import DynavitError
from dynavit.model import DynamicModel, load
from dynavit.sweep.store import ResultStore, StoreError


def model_fingerprint(dm: DynamicModel) -> str:
    """The weights a sweep measures: the base model's, then each attached multiplexed model and variant's.

    A calibrated model is known by its calibration's fingerprint (the weights before reordering).
    """
    calib = dm.calibration
    fp = calib.fingerprint if calib is not None and calib.fingerprint else fingerprint(dm.base_module)
    # mux=N and variant rows are measured on the attached models: they are part of what was measured
    fp += "".join(f" mux{n}:{fingerprint(m)}" for n, m in sorted(dm.multiplexers.items()))
    return fp + "".join(f" variant:{k}:{model_fingerprint(v)}" for k, v in sorted(dm.variants.items()))


def load_model(source: str, *, calibration: str | None = None, multiplexers: Iterable[str] = (),
               variants: Mapping[str, str] | None = None, device: str = "cpu",
               variant_calibrations: Mapping[str, str] | None = None) -> DynamicModel:
    """``source`` with its calibration, multiplexed models and variants (each with its own calibration,
    ``variant_calibrations``: name -> folder) attached: a sweep's model."""
    dm = load(source, device=device)
    if not dm.dynamic:
        raise DynavitError(f"{source} ({dm.family}) has no execution paths to sweep")
    if calibration:
        dm.load_calibration(calibration)
    for folder in multiplexers:
        dm.add_multiplexer(folder)
    calibs = dict(variant_calibrations or {})
    if unknown := sorted(set(calibs) - set(variants or {})):
        raise DynavitError(f"a calibration is given for variant {unknown[0]!r}, which is not among the variants")
    for name, other in (variants or {}).items():
        v = load(other, device=device)
        if not v.dynamic:
            raise DynavitError(f"variant {name!r}: {other} ({v.family}) has no execution paths to sweep")
        if calibs.get(name):
            v.load_calibration(calibs[name])
        check_same_input(dm, v, name)
        dm.add_variant(name, v)
    return dm


def check_same_input(dm: DynamicModel, variant: DynamicModel, name: str) -> None:
    """Refuse a variant that wants its images prepared otherwise: a sweep decodes them once, for the base."""
    ours = (tuple(dm.input_size), tuple(dm.mean), tuple(dm.std), dm.crop_pct)
    theirs = (tuple(variant.input_size), tuple(variant.mean), tuple(variant.std), variant.crop_pct)
    if ours != theirs:
        raise DynavitError(f"variant {name!r} ({variant.source}) takes images as (size, mean, std, crop) "
                           f"{theirs}, the base model {dm.source} as {ours}: the sweep's images are decoded once "
                           "for the base model, so every variant must share its transform")


def calibration_identity(dm: DynamicModel) -> str:
    """How the measured models were calibrated: the base model's, then each variant's ("none": uncalibrated)."""
    def one(m: DynamicModel) -> str:
        return m.calibration.identity() if m.calibration is not None else "none"
    return one(dm) + "".join(f" variant:{k}:{one(v)}" for k, v in sorted(dm.variants.items()))


def check_measured(dm: DynamicModel, meta: Mapping[str, str], store: str | Path) -> None:
    """Refuse ``dm`` unless its weights are those the store's rows were measured on."""
    ours, theirs = model_fingerprint(dm), meta.get("model_fingerprint", "?")
    if ours != theirs:
        raise DynavitError(f"{store} was measured on {meta.get('model')} (weights {theirs[:12]}), not on "
                           f"{dm.source} (weights {ours[:12]}): its rows do not hold for this model; use a store "
                           "swept with these weights (the same calibration and multiplexed models)")


def read_store(store: str | Path) -> tuple[dict[str, str], dict[str, Any]]:
    """(identity, the last sweep run's target fields, {} if it records none) of a store with results."""
    with ResultStore(store, readonly=True) as rs:
        if not len(rs):
            raise DynavitError(f"{store} has no results yet; run `dynavit sweep` first")
        try:
            return rs.meta, rs.last_target()
        except StoreError:  # rows written without a sweep run: nothing to rebuild the model from
            return rs.meta, {}


def load_measured(store: str | Path, model: str | DynamicModel | None = None, *,
                  device: str | None = None) -> tuple[DynamicModel, dict[str, Any]]:
    """The store's model as its sweep measured it (or ``model``, loaded alike), and the sweep's target fields.

    A loaded ``model`` is taken as it is; a name or folder gets the sweep's calibration, multiplexed
    models and variants. Either is refused when its weights fingerprint is not the store's.
    ``device``: where to load it (default: where the sweep ran).
    """
    meta, target = read_store(store)
    if isinstance(model, DynamicModel):
        dm = model
    elif model is None and not target:
        raise DynavitError(f"{store} records no sweep run to rebuild its model from; give the model")
    else:
        dm = load_model(str(model or target["model"]), calibration=target.get("calibration"),
                        multiplexers=target.get("multiplexers") or (), variants=target.get("variants"),
                        device=device or target.get("device") or "cpu",
                        variant_calibrations=target.get("variant_calibrations"))
    check_measured(dm, meta, store)
    return dm, target
