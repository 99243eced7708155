"""Optional dependencies, installed as extras of the package: imported when a feature first needs one, with the pip
line that installs it when it is missing. (No torch here.)

    pip install 'elbox[report]'        matplotlib: the report's curves and latent figures, elbox ood's histograms
    pip install 'elbox[tables]'        pyarrow: CSV and Parquet tables as data
    pip install 'elbox[tensorboard]'   tensorboard: --logger tensorboard
    pip install 'elbox[all]'           all three
"""

from __future__ import annotations

import importlib
from types import ModuleType

from elbox.core.errors import ElboxError

EXTRAS = {"matplotlib": "report", "pyarrow": "tables", "tensorboard": "tensorboard"}  # module: the extra with it


def require(module: str, feature: str) -> ModuleType:
    """The module (e.g. "matplotlib.pyplot"), imported; ElboxError naming the feature and the extra to install when
    its package is missing."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ElboxError(
            f"{feature} needs {package}, which is not installed: pip install 'elbox[{EXTRAS[package]}]'"
        ) from None
