"""elbox: generative models trained by maximizing the evidence lower bound.

The public API:
    elbox.fit(model, data, out=..., **options) -> Run     train, or fit in closed form / by EM
    elbox.resume(run_dir) -> Run                          continue an interrupted run, bit for bit
    elbox.evaluate(model, data, iw_samples=[...]) -> dict what `elbox evaluate` prints
    elbox.load(directory) -> model                        a run directory or save_pretrained output
    elbox.save_pretrained(model, directory)               config.json + model.safetensors
    elbox.sample / score / encode                         using a trained model (elbox.evaluation.inference)
    elbox.ood(run, outliers) -> dict                      out-of-distribution detection by every anomaly score
    elbox.anomaly_scores(run, data, methods)              per-example anomaly scores and p-values
    (elbox.evaluation.detection)
Model names and config classes: elbox.models.

The names load on first use (a module __getattr__): `import elbox` and `elbox --help` do not import torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from elbox.core import log as _log  # noqa: F401 (sets up the "elbox" logger's handler; no torch)
from elbox.core.errors import ElboxError  # no torch
from elbox.core.version import __version__

if TYPE_CHECKING:
    from elbox.evaluation.detection import anomaly_scores, ood
    from elbox.evaluation.inference import encode, sample, score
    from elbox.evaluation.runs import evaluate
    from elbox.io.checkpoint import save_pretrained
    from elbox.io.run_config import TrainConfig
    from elbox.models import MODELS, LatentVariableModel, register_model
    from elbox.training.resuming import resume
    from elbox.training.workflows import Run, fit

__all__ = [
    "ElboxError",
    "LatentVariableModel",
    "MODELS",
    "Run",
    "TrainConfig",
    "__version__",
    "anomaly_scores",
    "encode",
    "evaluate",
    "fit",
    "load",
    "ood",
    "register_model",
    "resume",
    "sample",
    "save_pretrained",
    "score",
]

_LAZY = {  # public name -> the module that defines it, imported when the name is first used
    "save_pretrained": "elbox.io.checkpoint",
    "encode": "elbox.evaluation.inference",
    "sample": "elbox.evaluation.inference",
    "score": "elbox.evaluation.inference",
    "MODELS": "elbox.models",
    "LatentVariableModel": "elbox.models",
    "register_model": "elbox.models",
    "TrainConfig": "elbox.io.run_config",
    "Run": "elbox.training.workflows",
    "evaluate": "elbox.evaluation.runs",
    "ood": "elbox.evaluation.detection",
    "anomaly_scores": "elbox.evaluation.detection",
    "fit": "elbox.training.workflows",
    "resume": "elbox.training.resuming",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'elbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later uses find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def load(directory: str | os.PathLike, device: str = "cpu", **modules):
    """Load a model saved by `elbox.save_pretrained` or trained by `elbox train` / `elbox.fit` (a run directory), in
    eval mode. Reads safetensors and JSON only; never unpickles. modules: the user-written networks a model was
    built with (e.g. encoder=..., decoder=... for a VAE with custom networks), which the config names."""
    from elbox.io.checkpoint import load_run

    return load_run(directory, device, **modules)[0]
