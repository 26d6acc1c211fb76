"""The model families dynavit runs with its own forward pass, in the order they are tried.

Adding a family is one new file in ``models/`` (a ``FamilyModel`` subclass, see ``base.py``)
plus one entry here.
"""

from __future__ import annotations

from torch import nn

from dynavit.models.base import FamilyModel
from dynavit.models.segformer import DynSegformer
from dynavit.models.static import StaticModel
from dynavit.models.swin import DynSwin
from dynavit.models.vit import DynViT

FAMILIES: tuple[type[FamilyModel], ...] = (DynViT, DynSwin, DynSegformer)


def family_class(source: nn.Module) -> type[FamilyModel]:
    """The first family that runs ``source``, or ``StaticModel`` (default path only) when none does."""
    for cls in FAMILIES:
        if not cls.unsupported(source):
            return cls
    return StaticModel


def unsupported_reasons(source: nn.Module) -> dict[str, str]:
    """Why each family declined ``source``: the message a user sees when no knob applies."""
    return {cls.family: cls.unsupported(source) for cls in FAMILIES}
