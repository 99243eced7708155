"""elbox: generative models trained by maximizing the evidence lower bound."""

from __future__ import annotations

import os

from elbox.errors import ElboxError

__version__ = "0.1.0"
__all__ = ["ElboxError", "__version__", "load"]


def load(directory: str | os.PathLike, device: str = "cpu"):
    """Load a model saved by `model.save_pretrained(directory)` or trained by `elbox train` (a run directory),
    in eval mode. Reads safetensors and JSON only; never unpickles."""
    from elbox.checkpoint import load_run

    return load_run(directory, device)[0]
