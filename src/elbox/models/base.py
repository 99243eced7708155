"""The model protocol, the registry of model classes, and building a model from its JSON config.

Every model returns nats per example, summed over data dimensions. A capability a model lacks is
absent rather than faked: the evaluator checks `hasattr(model, "log_weights")` and so on.

    elbo(x, n_samples=1) -> ELBOTerms          differentiable, per example
    log_weights(x, k) -> [k, B]                log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x)
    log_weights_sampler(x) -> (n -> [n, B])    optional: the same, with per-x work (the encoder) done once
    importance_samples(x, k, ...)              optional: draws, log weights and terms for the IWAE objective
    posterior_params(x), log_joint(x, z),
    encoder_parameters()                       optional: what `elbox tighten` needs (elbox.tighten)
    log_prob(x) -> [B]                          exact log p(x); tractable models only
    sample(n) -> [n, *data_shape]
    encode(x) -> [B, d]                        posterior mean, features for downstream use
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from elbox.errors import ElboxError

MODELS: dict[str, type["LatentVariableModel"]] = {}


class LatentVariableModel(nn.Module):
    """Base of every model: holds its config dataclass and names its data space."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    # False for models fitted by their own `fit(x, progress) -> list[dict]` (closed form, EM)
    trains_by_gradient: bool = True
    # False when some ELBOTerms.kl entries are Monte Carlo terms that are not KL divergences (free bits refused)
    kl_terms_are_kls: bool = True
    # True when elbo() returns ELBOTerms.objective, a surrogate to train on instead of the ELBO
    trains_on_surrogate: bool = False

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    @classmethod
    def from_config(cls, config: Any) -> "LatentVariableModel":
        """Build from a config dataclass. Models whose constructor takes other arguments override this."""
        return cls(config)

    @property
    def data_space(self) -> str:
        """Name of the elbox.data space the model's inputs must come from."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike, data: dict[str, Any] | None = None) -> None:
        """Write the model as a run directory (config.json + model.safetensors, the format `elbox` commands and
        `elbox.load` read; no pickle). `data` describes the training data ({"name": "fashion-mnist", ...}) so
        that `elbox evaluate` knows which dataset to use; the data space is always recorded."""
        from elbox.checkpoint import WEIGHTS_FILE, save_weights, write_run_config

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(directory / WEIGHTS_FILE, self)
        write_run_config(directory, self, {**(data or {}), "space": self.data_space}, train={})


def register_model(name: str, config_class: type):
    """Class decorator: make a model buildable by name from its config."""

    def decorate(cls: type[LatentVariableModel]) -> type[LatentVariableModel]:
        cls.name = name
        cls.config_class = config_class
        MODELS[name] = cls
        return cls

    return decorate


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from JSON values, rejecting unknown keys with a clear message."""
    if not isinstance(values, dict):
        raise ElboxError(f"model config must be a JSON object, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ElboxError(f"unknown {config_class.__name__} fields {unknown}; known fields: {sorted(known)}")
    try:
        return config_class(**values)
    except (TypeError, ValueError) as e:
        raise ElboxError(f"bad {config_class.__name__}: {e}") from None


def build_model(name: str, config: dict[str, Any] | Any) -> LatentVariableModel:
    """Build a registered model from a config dataclass or its JSON dict."""
    if name not in MODELS:
        raise ElboxError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    if isinstance(config, dict):
        config = config_from_dict(cls.config_class, config)
    return cls.from_config(config)


def per_level_temperatures(temperature: float | Sequence[float], levels: int) -> list[float]:
    """Sampling temperatures as a list, one per latent level (in level-name order z1, z2, ...): one value
    (or a list of one) applies to every level. Each must be finite and > 0."""
    values = [float(temperature)] * levels if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    if len(values) == 1:
        values = values * levels
    if len(values) != levels:
        raise ElboxError(f"give one temperature or one per level ({levels}), got {len(values)}")
    if not all(t > 0 and math.isfinite(t) for t in values):
        raise ElboxError(f"temperatures must be finite and > 0, got {values}")
    return values
