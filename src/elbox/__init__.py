"""elbox: generative models trained by maximizing the evidence lower bound."""

from elbox.errors import ElboxError

__version__ = "0.1.0"
__all__ = ["ElboxError", "__version__"]
