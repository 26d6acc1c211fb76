"""dynavit: run-time adaptive inference of vision transformers.

One pretrained model, many execution paths, and for every inference the most accurate
path that fits its budget. This package starts with the foundation every later layer
stands on: loading real models, reading real datasets, scoring them, and an exact
operator-class profiler.
"""

from dynavit.config import ConfigError, ExecConfig, Space
from dynavit.cost import Profile, profile
from dynavit.data import open_dataset
from dynavit.errors import BadSampleError, DynavitError
from dynavit.evaluation import evaluate as _evaluate
from dynavit.model import DynamicModel, LoadedModel, from_config, load

__version__ = "0.1.0"


def evaluate(model, data, **kwargs):
    """Evaluate ``model`` on a dataset folder or dataset object (see ``dynavit.evaluation``)."""
    if isinstance(model, str):
        model = load(model)
    dataset = open_dataset(data) if not hasattr(data, "load") else data
    return _evaluate(model, dataset, **kwargs)


__all__ = [
    "BadSampleError",
    "ConfigError",
    "DynamicModel",
    "ExecConfig",
    "Space",
    "DynavitError",
    "LoadedModel",
    "Profile",
    "__version__",
    "evaluate",
    "from_config",
    "load",
    "profile",
]
