"""Open a source model: a Hugging Face hub id, a local HF folder, timm, or a config preset.

What comes back is a :class:`Source`: the library's ``nn.Module`` in eval mode plus what
running it honestly needs (task, labels, the input size it was trained at, its normalisation).
``dynavit.model.load`` wraps it into a ``DynamicModel``; nothing else depends on which
library the weights came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from dynavit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dynavit.errors import DynavitError
from dynavit.models.configs import preset_config
from dynavit.models.registry import family_class

Task = Literal["classification", "segmentation"]

# model_type -> family; the family decides input-size rules and how the forward is called.
_FAMILIES = {"vit": "vit", "deit": "vit", "swin": "swin", "segformer": "segformer"}
_TIMM_PREFIXES = ("timm:", "timm/", "hf-hub:timm/")


@dataclass
class Source:
    """A source model as its library loaded it, with what running it honestly needs."""

    module: nn.Module
    name: str
    family: str  # the source's family name: vit, swin, segformer, or timm
    task: Task
    id2label: dict[int, str]
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    preprocessor: dict[str, Any] = field(default_factory=dict)


def open_source(name_or_path: str | os.PathLike) -> Source:
    """Load a source model from a local HF folder, a Hugging Face hub id, or a timm name.

    timm names are written ``timm:<name>`` (or ``timm/<name>`` as on the hub) and need the
    ``timm`` extra; ``config:<preset>`` (e.g. ``config:segformer-b2``) builds a randomly
    initialised architecture for cost studies. Offline and not cached raises a DynavitError that says how to fix it.
    """
    name = str(name_or_path)
    if name.startswith("config:"):
        return source_from_config(preset_config(name[7:]), source=name)
    if name.startswith(_TIMM_PREFIXES):
        return _load_timm(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DynavitError(
                f"{path} is not a Hugging Face model folder: expected a directory with config.json "
                "and model weights (model.safetensors)"
            )
        return _load_hf(str(path.resolve()), local=True)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DynavitError(f"model folder {name} does not exist")
    return _load_hf(name, local=False)


def source_from_config(config: Any, *, seed: int = 0, source: str | None = None) -> Source:
    """A randomly initialised source model from a transformers config (for tests and cost studies)."""
    model_cls = _hf_model_class(config)
    torch.manual_seed(seed)
    module = model_cls(config).eval()
    return _wrap_hf(module, source or f"{type(config).__name__}(random init)", preprocessor={})


def build_module(config: Any) -> nn.Module:
    """A transformers model of ``config``'s architecture, with its own initialisation."""
    return _hf_model_class(config)(config)


def source_from_module(module: nn.Module, source: str, preprocessor: dict[str, Any]) -> Source:
    """A transformers model made here (e.g. a derived one) as a source, with the preprocessing given."""
    return _wrap_hf(module, source, preprocessor)


def _hf_model_class(config: Any) -> type[nn.Module]:
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


def _load_hf(name: str, *, local: bool) -> Source:
    if local:
        _refuse_pickles(Path(name))
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DynavitError(_hub_error(name, e, local)) from None
    except Exception as e:  # noqa: BLE001 - transformers validates config fields with errors of its own
        if not local:
            raise
        raise DynavitError(f"cannot load {Path(name) / 'config.json'}: {_one_line(e)}") from None
    model_cls = _hf_model_class(config)
    try:
        # fp32 whatever the stored dtype: fp16 checkpoints (e.g. committed small models) run on CPU too
        module = model_cls.from_pretrained(name, config=config, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise DynavitError(_hub_error(name, e, local)) from None
    except Exception as e:  # noqa: BLE001 - a damaged folder makes transformers raise anything at all
        if not local:
            raise
        raise DynavitError(_folder_error(Path(name), e)) from None
    preprocessor: dict[str, Any] = {}
    pp = Path(name) / "preprocessor_config.json" if local else None
    if pp is not None and pp.is_file():
        try:
            preprocessor = json.loads(pp.read_text())
        except (OSError, ValueError) as e:
            raise DynavitError(f"cannot read {pp}: {e}") from None
    elif not local:
        preprocessor = _cached_preprocessor(name)
    return _wrap_hf(module, name, preprocessor)


TRUST_PICKLE = "DYNAVIT_TRUST_PICKLE"
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _refuse_pickles(folder: Path) -> None:
    """Refuse weights stored as a pickle (loading one can run any code) unless the user opts in."""
    if any(folder.glob("*.safetensors")) or os.environ.get(TRUST_PICKLE, "") not in ("", "0"):
        return
    pickles = sorted(p.name for pattern in _PICKLES for p in folder.glob(pattern))
    if pickles:
        raise DynavitError(f"{folder / pickles[0]} is a pickle, and loading a pickle can run any code it holds: "
                           f"convert it to model.safetensors, or set {TRUST_PICKLE}=1 if you trust its source")


def _one_line(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:240] or type(err).__name__


def _folder_error(folder: Path, err: Exception) -> str:
    """One line naming the file of a local model folder that could not be loaded."""
    first = _one_line(err)
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - any failure to open is the answer
            return f"cannot load {weights}: it is damaged or truncated ({_one_line(e)})"
    return (f"cannot load the model in {folder}: its config.json does not describe a model that can be built "
            f"({type(err).__name__}: {first})")


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
        return json.loads(Path(hf_hub_download(name, "preprocessor_config.json")).read_text())
    except Exception:  # noqa: BLE001 - a missing preprocessor config just means defaults
        return {}


def _wrap_hf(module: nn.Module, source: str, preprocessor: dict[str, Any]) -> Source:
    config = module.config
    task: Task = "segmentation" if "SemanticSegmentation" in type(module).__name__ else "classification"
    return Source(
        module=module,
        name=source,
        family=_FAMILIES[config.model_type],
        task=task,
        id2label={int(k): str(v) for k, v in (config.id2label or {}).items()},
        input_size=family_class(module).default_input_size(module, preprocessor),
        mean=tuple(preprocessor.get("image_mean", IMAGENET_MEAN)),
        std=tuple(preprocessor.get("image_std", IMAGENET_STD)),
        crop_pct=float(preprocessor.get("crop_pct") or 0.875),
        preprocessor=preprocessor,
    )


def _load_timm(name: str) -> Source:
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
    return Source(
        module=module,
        name=name,
        family="timm",
        task="classification",
        id2label={i: str(i) for i in range(num)},
        input_size=(int(h), int(w)),
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        crop_pct=float(data_cfg.get("crop_pct", 0.875)),
    )
