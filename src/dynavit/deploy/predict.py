"""Predict over a folder of images: top-k labels per image, or a PNG class mask per image for segmentation.

Decoding is the evaluation pipeline's (``pipeline.batches`` over ``UnlabelledImages``: threaded, in
order, the model's own transform), so a prediction sees exactly the pixels an evaluation does. A
file that cannot be decoded is counted and listed, not fatal. The path is a config, or the most
accurate path of a sweep store's menu within a latency budget (re-timed here by
``runtime.startup.start``, as serving does).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dynavit.config import ExecConfig
from dynavit.data.files import require_dir
from dynavit.data.layouts import UnlabelledImages
from dynavit.errors import DynavitError
from dynavit.model import DynamicModel, load
from dynavit.pipeline import batches
from dynavit.runtime.startup import start
from dynavit.serve.predictions import label_map, top_labels


@dataclass
class Predictions:
    """Records in file order (``records``), the files that could not be read (``bad``) and the path that ran."""

    records: list[dict[str, Any]]
    bad: list[str] = field(default_factory=list)
    config: ExecConfig = field(default_factory=ExecConfig)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def write_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        return path


def choose_path(model: DynamicModel | str, *, config: ExecConfig | dict | None = None, budget_ms: float | None = None,
                store: str | Path | None = None, profile_runs: int = 10) -> tuple[DynamicModel, ExecConfig]:
    """The model and the path to run: ``config``, or the store menu's best path within ``budget_ms``."""
    if budget_ms is not None:
        if store is None or config is not None:
            raise DynavitError("a latency budget picks a path from a sweep store's menu: give a store and no config")
        s = start(store, model, profile_runs=profile_runs, rescue=False)
        return s.model, s.controller.select(latency_ms=budget_ms).config
    dm = load(model) if isinstance(model, str | Path) else model
    cfg = config if isinstance(config, ExecConfig) else ExecConfig.from_dict(config or {})
    return dm, cfg


def predict(model: DynamicModel | str, images: str | Path, *, config: ExecConfig | dict | None = None,
            budget_ms: float | None = None, store: str | Path | None = None, topk: int = 5, batch_size: int = 16,
            masks: str | Path | None = None, progress: bool = False) -> Predictions:
    """Predict every image under ``images`` (any depth) on one path; see ``choose_path`` for the path.

    Classification: each record is ``{"file", "topk": [{"index", "label", "probability"}, ...]}``.
    Segmentation: each mask is written as ``<masks>/<relative path>.png`` (class index per pixel, at
    the model's input size) and the record is ``{"file", "mask", "classes"}``.
    """
    if topk < 1 or batch_size < 1:
        raise DynavitError(f"topk and batch_size must be at least 1 (got topk={topk}, batch_size={batch_size})")
    dm, cfg = choose_path(model, config=config, budget_ms=budget_ms, store=store)
    dataset = UnlabelledImages(require_dir(Path(images), "image folder"))
    if dm.task == "segmentation" and masks is None:
        raise DynavitError("a segmentation model writes one mask per image: give a folder for the masks")
    dm.configure(cfg)
    if hasattr(dm, "eval"):
        dm.eval()
    device = next(dm.parameters()).device if isinstance(dm, torch.nn.Module) else torch.device("cpu")
    bad: list[str] = []
    records: list[dict[str, Any]] = []
    files = iter(range(len(dataset)))
    with tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar, \
            torch.inference_mode():
        for batch in batches(dataset, dm.transform, batch_size=batch_size, skip_bad=True, skipped=bad, bar=bar):
            logits = dm(batch.pixels.to(device)).float().cpu()
            done = set(bad)
            for row in logits:
                path = next(p for p in (dataset.path(i) for i in files) if str(p) not in done)
                records.append(_record(dm, row, path, dataset.root, topk, masks))
            bar.update(len(batch))
    return Predictions(records, bad, cfg)


def _record(dm: Any, logits: torch.Tensor, path: Path, root: Path, topk: int, masks: str | Path | None) -> dict:
    rel = path.relative_to(root)
    if dm.task == "segmentation":
        h, w = dm.input_size
        labels = label_map(logits, (w, h))
        mask = labels.to(torch.uint8 if logits.shape[0] <= 256 else torch.int32).numpy()
        out = Path(masks) / rel.with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(out)
        present = [int(c) for c in np.unique(mask)]
        return {"file": str(rel), "mask": str(out), "classes": {str(c): dm.id2label.get(c, str(c)) for c in present}}
    return {"file": str(rel), "topk": top_labels(dm, logits, topk)}
