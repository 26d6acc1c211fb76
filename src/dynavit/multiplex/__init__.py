"""Several images per ViT forward pass: ConcatPlexer and the Image Multiplexer (see ``models.py``)."""

from dynavit.multiplex.io import load_multiplexer, save_multiplexer
from dynavit.multiplex.models import ARCHS, ConcatPlexer, ImageMultiplexer, MuxModel, build, reduction

__all__ = ["ARCHS", "ConcatPlexer", "ImageMultiplexer", "MuxModel", "build", "load_multiplexer", "reduction",
           "save_multiplexer"]
