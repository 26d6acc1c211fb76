"""An exported menu folder run by ONNX Runtime, model-like for the runner, the controller and the server.

``OnnxPaths(folder)`` opens one ``InferenceSession`` per path of the folder's ``menu.json``;
``configure(cfg)`` picks the session, calling it runs it on a (B, 3, H, W) tensor and returns
the logits as a tensor, so ``runtime.run``, ``Controller.profile`` and the server's batcher use it
as they use the PyTorch model. ``menu()`` is the folder's menu (quality and costs as the store
measured them; ``Controller.profile`` re-times them here). The sessions carry no deadline: a
graph runs whole (``module.supports_deadline`` is False). onnxruntime is the ``onnx`` extra.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynavit.config import ConfigError, ExecConfig
from dynavit.deploy.folder import entry_from_record, read_folder
from dynavit.errors import DynavitError
from dynavit.model import eval_transform
from dynavit.runtime.menu import Menu


def _onnxruntime() -> Any:
    try:
        import onnxruntime  # the onnx extra
    except ImportError:
        raise DynavitError("running ONNX files needs the onnx extra: pip install 'dynavit[onnx]'") from None
    return onnxruntime


def session(path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime session on ``path`` (``threads``: intra-op threads, default torch's count)."""
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # no spin-waiting after a run: the threads would burn the cores the next path (or PyTorch) needs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def run_session(sess: Any, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``sess`` on ``x`` (the exported input name is the first input)."""
    arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: arr})[0])


class OnnxPaths:
    """One session per exported path; ``configure`` + call, like the model (see the module docstring)."""

    device = "cpu"  # inputs are handed over as CPU arrays, whatever provider runs them

    def __init__(self, folder: str | Path, *, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.folder = Path(folder)
        meta = read_folder(self.folder)
        if meta.get("format") != "onnx":
            raise DynavitError(f"{self.folder} holds {meta.get('format')} files; ONNX Runtime runs onnx exports")
        self.meta = meta
        self.source, self.family, self.task = meta["model"], meta["family"], meta["task"]
        self.input_size = tuple(meta["input_size"])
        self.mean, self.std, self.crop_pct = tuple(meta["mean"]), tuple(meta["std"]), meta["crop_pct"]
        self.id2label = {int(k): v for k, v in meta["id2label"].items()}
        self.entries = [entry_from_record(p) for p in meta["paths"]]
        self.sessions = {e.config: session(self.folder / p["file"], providers, threads)
                         for e, p in zip(self.entries, meta["paths"], strict=True)}
        self.module = types.SimpleNamespace(supports_deadline=False, deadline=None)  # a session runs whole
        self.calibration = None
        self._config = self.entries[0].config

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def exec_config(self) -> ExecConfig:
        return self._config

    @property
    def transform(self) -> Any:
        return eval_transform(self.task, self.input_size, self.mean, self.std, self.crop_pct)

    def menu(self) -> Menu:
        return Menu(list(self.entries), model=self)

    def example_input(self, batch: int = 1, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Random input as the exported graphs take it (the model's input size: it is fixed in the graphs)."""
        if size is not None and tuple(size) != self.input_size:
            raise DynavitError(f"the exported paths take {self.input_size[0]}x{self.input_size[1]} inputs, "
                               f"not {size[0]}x{size[1]}")
        return torch.randn(batch, 3, *self.input_size, generator=torch.Generator().manual_seed(0))

    def configure(self, cfg: ExecConfig | dict | None = None, **changes: Any) -> OnnxPaths:
        cfg = ExecConfig() if cfg is None else cfg if isinstance(cfg, ExecConfig) else ExecConfig.from_dict(cfg)
        if changes:
            cfg = cfg.replace(**changes)
        if cfg not in self.sessions:
            raise ConfigError(f"{cfg!r} is not one of the {len(self.sessions)} exported paths in {self.folder}")
        self._config = cfg
        return self

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return run_session(self.sessions[self._config], pixel_values)
