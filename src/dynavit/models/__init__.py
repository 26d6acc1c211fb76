"""Model families (one file each), the registry that picks one, and opening source models (``hub``)."""

from dynavit.models.base import FamilyModel
from dynavit.models.hub import Source, open_source
from dynavit.models.registry import FAMILIES, family_class

__all__ = ["FAMILIES", "FamilyModel", "Source", "family_class", "open_source"]
