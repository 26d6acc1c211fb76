"""Loading pretrained vision transformers from Hugging Face (or timm) into one wrapper."""

from dynavit.models.loading import LoadedModel, from_config, load

__all__ = ["LoadedModel", "from_config", "load"]
