"""dynavit: run-time adaptive inference of vision transformers.

One pretrained model, many execution paths, and for every inference the most accurate
path that fits its budget. The public surface: ``load`` a model (a ``torch.nn.Module``),
``configure`` an ``ExecConfig``, ``profile`` and ``evaluate`` it, sweep its paths into a
store (``dynavit.sweep``), read the store's ``Menu`` and let a ``Controller`` pick a path
per inference; take paths to production (``DynamicModel.export`` / ``compile``, ``predict``
over a folder, ``dynavit.deploy``).
"""

from dynavit.config import ConfigError, ExecConfig, Space
from dynavit.cost import Profile, profile
from dynavit.data import open_dataset
from dynavit.deploy.predict import predict
from dynavit.errors import BadSampleError, DynavitError
from dynavit.evaluation import evaluate as _evaluate
from dynavit.model import DynamicModel, LoadedModel, from_config, load
from dynavit.runtime import Controller, Menu
from dynavit.sweep import ResultStore, SweepTarget, pareto, run_sweep
from dynavit.version import __version__


def evaluate(model, data, **kwargs):
    """Evaluate ``model`` on a dataset folder or dataset object (see ``dynavit.evaluation``)."""
    if isinstance(model, str):
        model = load(model)
    dataset = open_dataset(data) if not hasattr(data, "load") else data
    return _evaluate(model, dataset, **kwargs)


__all__ = [
    "BadSampleError",
    "ConfigError",
    "Controller",
    "DynamicModel",
    "ExecConfig",
    "Space",
    "DynavitError",
    "LoadedModel",
    "Menu",
    "Profile",
    "ResultStore",
    "SweepTarget",
    "__version__",
    "evaluate",
    "from_config",
    "load",
    "pareto",
    "predict",
    "profile",
    "run_sweep",
]
