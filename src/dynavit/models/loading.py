"""Load a vision transformer from a Hugging Face hub id, a local HF folder, or timm.

Every model comes back as a :class:`LoadedModel`: the ``nn.Module`` in eval mode plus what
a caller needs to run it honestly (its task, labels, evaluation transform, the input sizes
it can take). Later layers (profiler, execution paths, sweeps) depend only on this wrapper,
never on which library the weights came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dynavit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dynavit.errors import DynavitError

Task = Literal["classification", "segmentation"]

# model_type -> family; the family decides input-size rules and how the forward is called.
_FAMILIES = {"vit": "vit", "deit": "vit", "swin": "swin", "segformer": "segformer"}
_TIMM_PREFIXES = ("timm:", "timm/", "hf-hub:timm/")


@dataclass
class LoadedModel:
    """A model ready for inference, with the metadata evaluation and profiling need."""

    module: nn.Module
    family: str
    task: Task
    id2label: dict[int, str]
    input_size: tuple[int, int]
    source: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def config(self) -> Any:
        return getattr(self.module, "config", None)

    @property
    def transform(self):
        """The standard evaluation transform for this model (DeiT protocol or seg resize)."""
        from dynavit.data.transforms import ClassificationTransform, SegmentationTransform

        if self.task == "classification":
            crop = self.input_size
            return ClassificationTransform(
                crop=crop, resize=int(min(crop) / self.crop_pct), mean=self.mean, std=self.std
            )
        return SegmentationTransform(size=self.input_size, mean=self.mean, std=self.std)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise a one-line DynavitError if the model cannot take an input of this size."""
        if height <= 0 or width <= 0:
            raise DynavitError(f"input size {height}x{width} is invalid: both sides must be positive")
        mult = self._size_multiple()
        if height % mult or width % mult:
            raise DynavitError(
                f"input size {height}x{width} does not fit {self.source} ({self.family}): "
                f"height and width must be multiples of {mult}"
            )

    def _size_multiple(self) -> int:
        cfg = self.config
        if self.family == "vit":
            return int(cfg.patch_size)
        if self.family == "swin":
            # patch embedding, then one 2x patch merging per stage after the first
            return int(cfg.patch_size) * 2 ** (len(cfg.depths) - 1)
        if self.family == "segformer":
            return 32  # four stride-2+ stages: keeps every stage's feature map integral
        if self.family == "timm":
            patch = getattr(getattr(self.module, "patch_embed", None), "patch_size", (16, 16))
            return int(patch[0])
        return 1

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits: (B, labels) for classification, (B, labels, h, w) for segmentation."""
        if self.family == "timm":
            return self.module(pixel_values)
        kwargs: dict[str, Any] = {}
        if self.family == "vit" and tuple(pixel_values.shape[-2:]) != self.input_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self.module(pixel_values=pixel_values, **kwargs)
        return out.logits

    def example_input(self, batch: int = 1, size: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = size or self.input_size
        self.check_input_size(h, w)
        param = next(self.module.parameters())
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, h, w, generator=g).to(device=param.device, dtype=param.dtype)


def load(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model from a local HF folder, a Hugging Face hub id, or a timm name.

    timm names are written ``timm:<name>`` (or ``timm/<name>`` as on the hub) and need the
    ``timm`` extra; ``config:<preset>`` (e.g. ``config:segformer-b2``) builds a randomly
    initialised architecture for cost studies. Offline and not cached raises a DynavitError that says how to fix it.
    """
    name = str(name_or_path)
    if name.startswith("config:"):
        from dynavit.models.configs import preset_config

        lm = from_config(preset_config(name[7:]), source=name)
    elif name.startswith(_TIMM_PREFIXES):
        lm = _load_timm(name)
    else:
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir() or not (path / "config.json").is_file():
                raise DynavitError(
                    f"{path} is not a Hugging Face model folder: expected a directory with config.json "
                    "and model weights (model.safetensors)"
                )
            lm = _load_hf(str(path.resolve()), local=True)
        elif name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise DynavitError(f"model folder {name} does not exist")
        else:
            lm = _load_hf(name, local=False)
    lm.module.to(device)
    return _dynamic_if_supported(lm)


def _dynamic_if_supported(lm: LoadedModel) -> LoadedModel:
    """Families with a dynavit forward pass come back as a DynamicModel (same interface, plus knobs)."""
    from dynavit.dynamic import DynamicModel, supports

    if isinstance(lm, DynamicModel) or not supports(lm):
        return lm
    return DynamicModel.from_loaded(lm)


def from_config(config: Any, *, seed: int = 0, source: str | None = None) -> LoadedModel:
    """A randomly initialised model from a transformers config (for tests and cost studies)."""
    model_cls = _hf_model_class(config)
    torch.manual_seed(seed)
    module = model_cls(config).eval()
    return _dynamic_if_supported(_wrap_hf(module, source or f"{type(config).__name__}(random init)", preprocessor={}))


def _hf_model_class(config: Any) -> type[nn.Module]:
    import transformers

    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        supported = ", ".join(sorted(_FAMILIES))
        raise DynavitError(f"model type {model_type!r} is not supported yet (supported: {supported})")
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and ("ForImageClassification" in arch or "ForSemanticSegmentation" in arch):
            return cls
    if model_type == "segformer":
        return transformers.SegformerForSemanticSegmentation
    return transformers.AutoModelForImageClassification._model_mapping[type(config)]


def _load_hf(name: str, *, local: bool) -> LoadedModel:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DynavitError(_hub_error(name, e, local)) from None
    model_cls = _hf_model_class(config)
    try:
        # fp32 whatever the stored dtype: fp16 checkpoints (e.g. committed small models) run on CPU too
        module = model_cls.from_pretrained(name, config=config, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise DynavitError(_hub_error(name, e, local)) from None
    preprocessor: dict[str, Any] = {}
    pp = Path(name) / "preprocessor_config.json" if local else None
    if pp is not None and pp.is_file():
        preprocessor = json.loads(pp.read_text())
    elif not local:
        preprocessor = _cached_preprocessor(name)
    return _wrap_hf(module, name, preprocessor)


def _hub_error(name: str, err: Exception, local: bool) -> str:
    if local:
        return f"cannot load model folder {name}: {str(err).splitlines()[0]}"
    text = str(err)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or any(
        s in text for s in ("offline", "couldn't connect", "Cannot find the requested files", "cached")
    )
    if offline:
        return (
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached: "
            "pass a local model folder (with config.json and model.safetensors), or go online "
            "(unset HF_HUB_OFFLINE) to download it once"
        )
    return f"unknown model {name!r}: not a local folder and not a Hugging Face hub model id ({text.splitlines()[0]})"


def _cached_preprocessor(name: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "preprocessor_config.json")).read_text())
    except Exception:  # noqa: BLE001 - a missing preprocessor config just means defaults
        return {}


def _wrap_hf(module: nn.Module, source: str, preprocessor: dict[str, Any]) -> LoadedModel:
    config = module.config
    family = _FAMILIES[config.model_type]
    task: Task = "segmentation" if "SemanticSegmentation" in type(module).__name__ else "classification"
    if family == "segformer":
        size = preprocessor.get("size", {"height": 512, "width": 512})
        input_size = (int(size.get("height", 512)), int(size.get("width", 512)))
    else:
        s = config.image_size
        input_size = (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    return LoadedModel(
        module=module,
        family=family,
        task=task,
        id2label=id2label,
        input_size=input_size,
        source=source,
        mean=tuple(preprocessor.get("image_mean", IMAGENET_MEAN)),
        std=tuple(preprocessor.get("image_std", IMAGENET_STD)),
        crop_pct=float(preprocessor.get("crop_pct") or 0.875),
    )


def _load_timm(name: str) -> LoadedModel:
    """timm path: kept small; timm only imports where torchvision matches torch."""
    try:
        import timm
        from timm.data import resolve_data_config
    except Exception as e:  # noqa: BLE001 - any import failure means the extra is unusable here
        raise DynavitError(
            f"cannot load {name}: timm does not import here ({type(e).__name__}); install it with "
            "`pip install 'dynavit[timm]'` on a machine where torchvision matches torch"
        ) from None
    model_name = name.split(":", 1)[1] if name.startswith("timm:") else "hf-hub:" + name.removeprefix("hf-hub:")
    try:
        module = timm.create_model(model_name, pretrained=True).eval()
    except Exception as e:  # noqa: BLE001 - timm raises many types for unknown / unreachable models
        raise DynavitError(f"cannot load timm model {model_name!r}: {str(e).splitlines()[0]}") from None
    data_cfg = resolve_data_config({}, model=module)
    _, h, w = data_cfg["input_size"]
    num = int(getattr(module, "num_classes", 0))
    return LoadedModel(
        module=module,
        family="timm",
        task="classification",
        id2label={i: str(i) for i in range(num)},
        input_size=(int(h), int(w)),
        source=name,
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        crop_pct=float(data_cfg.get("crop_pct", 0.875)),
    )
