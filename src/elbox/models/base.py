"""The model interface, the registry of model classes, and building a model from its JSON config.

Every model subclasses LatentVariableModel and returns nats per example, summed over data dimensions:

    sample(n) -> [n, *data_shape]              (required)
    elbo(x, n_samples=1) -> ELBOTerms          differentiable, per example (every latent-variable model; the
                                               Gaussian, which has no latent, has log_prob instead)
    data_space                                 the elbox.data space its inputs come from (required)

A capability a model lacks is absent rather than faked. The optional capabilities are the Protocols below;
the evaluator, trainer and commands dispatch with isinstance(model, Protocol). The other questions asked of a model
are attributes LatentVariableModel declares with a default (trains_by_gradient, inexact_kl_terms, ...), set per
instance where they depend on the config:

    LowerBounded         elbo(x, n_samples) -> ELBOTerms      the ELBO (every model with a latent)
    ExactLikelihood      log_prob(x) -> [B]                   exact log p(x)
    ImportanceWeighted   log_weights(x, k) -> [k, B]          log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x)
    ImportanceSampled    importance_samples(x, k, ...)        draws, log weights and terms (IWAE objective)
    Encoder              encode(x) -> [B, d]                  posterior mean, features for downstream use
    Reconstructs         reconstruct(x) -> like x             mean of p(x|z) at the posterior mean
    Hierarchical         encode_levels(x) -> {level: means}   per-level posterior means
    Tightenable          posterior_params, log_joint, encoder_parameters (elbox.evaluation.tighten)
    LevelBounds          log_weights_above_sampler(x, k)      the bound L^{>k} (elbox.evaluation.anomaly's llr)
    DataInitialized      initialize_from_data(x)              data-dependent initialization before training
    ClosedFormFit        fit(x, callback) -> records          closed form or EM, no gradients (trains_by_gradient False)
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from elbox.core.bounds import ELBOTerms
from elbox.core.errors import ElboxError
from elbox.core.options import config_from_dict, drop_ignored_options, short_repr
from elbox.data.spaces import VECTOR_MODELS

MODELS: dict[str, type[LatentVariableModel]] = {}
# the run-config format (config.json's format_version) this elbox writes; older ones are upgraded on reading:
# 2: the likelihood options are model-config fields (sigma, n_mixtures), no longer a dict "likelihood_options";
# 3: options another makes ignored are refused (option's used_with); one HVAE config per type, levels listed z1 first
CONFIG_VERSION = 3
Callback = Callable[[dict], None]

# Size bounds of the model options: generous, yet what one machine can hold (build_model also counts the parameters)
MAX_DATA_SIZE = 2**28  # values of one example (data_shape's product): 1 GiB in float32
MAX_DATA_DIMS = 4  # dimensions of data_shape
MAX_WIDTH = 10**6  # a latent dimension, a layer's width, a number of channels
MAX_DEPTH = 100  # latent levels, residual blocks per level
DATA_SHAPE_LIMITS = {"minimum": 1, "maximum": MAX_DATA_SIZE, "max_items": MAX_DATA_DIMS, "cli": False}  # option(**...)


class LatentVariableModel(nn.Module):
    """Base of every model: holds its config dataclass and names its data space."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    # training options whose default differs for this model (see training_defaults)
    train_defaults: ClassVar[dict[str, Any]] = {}
    # Declared capabilities: a class sets the ones that differ; one that depends on the config is set per instance in
    # __init__ (never a property), so the built model answers (tests/test_layout.py keeps it so).
    # False for models fitted by their own `fit(x, callback) -> list[dict]` (ClosedFormFit: closed form, EM)
    trains_by_gradient: bool = True
    # the names of the ELBOTerms.kl entries that are Monte Carlo terms, not exact KL divergences (ELBOTerms.inexact_kl;
    # free bits are refused for such a model)
    inexact_kl_terms: frozenset[str] = frozenset()
    # True when elbo() returns ELBOTerms.objective, a surrogate to train on instead of the ELBO
    trains_on_surrogate: bool = False
    # False when importance_samples refuses q's parameters detached (no STL or DReG estimator: hierarchical VAEs)
    detachable_posterior: bool = True
    # True when the encoder's q(z|x) can fall short of the best q of its family for an example: an amortization gap,
    # which the likelihood regret measures (False for the linear model: its best diagonal q is linear in x)
    amortization_gap: bool = False
    # how new input is read as the training data were (elbox.data.preprocessing.Preprocessing): set on a model that
    # was trained or loaded with its run; None for a model built from a config alone
    preprocessing: Any = None

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    @classmethod
    def training_defaults(cls, model_values: dict[str, Any]) -> dict[str, Any]:
        """The TrainConfig values this model defaults to differently, given the model options chosen so far (a
        model whose recipe depends on its options, e.g. the HVAE's type, overrides this)."""
        return dict(cls.train_defaults)

    @classmethod
    def config_class_for(cls, values: dict[str, Any]) -> type:
        """The config class that reads these JSON values: config_class, or for a model with one config per variant
        (the HVAE's types) the one they name."""
        return cls.config_class

    @classmethod
    def config_classes(cls) -> tuple[type, ...]:
        """Every config class of the model (one, or one per variant)."""
        return (cls.config_class,)

    @classmethod
    def variants_with(cls, name: str) -> str | None:
        """For a model with one config per variant: which variants have the option `name` (e.g. "hvae_type ladder"),
        to tell a user who gave it to another; None otherwise."""
        return None

    @classmethod
    def upgrade_config(cls, values: dict[str, Any], version: int) -> dict[str, Any]:
        """The JSON values of a config written by run-config format `version`, as the current config class reads them.
        Before version 3 an option that another made ignored (sigma of a bernoulli likelihood) was accepted
        silently: it is dropped, as it had no effect."""
        if version < 3:
            return drop_ignored_options(cls.config_class_for(values), values)
        return values

    @classmethod
    def from_config(cls, config: Any) -> LatentVariableModel:
        """Build from a config dataclass. Models whose constructor takes other arguments override this."""
        return cls(config)

    @property
    def data_space(self) -> str:
        """Name of the elbox.data space the model's inputs must come from (vectors, a data_shape (D,), come from the
        'real' space; the rule is elbox.data.model_data_space)."""
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        raise NotImplementedError

    def elbo_for_evaluation(self, x: Tensor, n_samples: int = 1) -> ELBOTerms:
        """The ELBO as the evaluator reports it; models with a cheaper training estimate override this."""
        return self.elbo(x, n_samples=n_samples)

    def elbo_protocol(self, n_samples: int) -> str:
        """How elbo_for_evaluation estimates the ELBO, in words, for the evaluation record."""
        return f"{n_samples} sample(s)"

    def activation_elements(self) -> int:
        """float32 elements of the largest per-sample activation of one example, for a model whose hidden state is
        larger than its likelihood's parameters (default 0)."""
        return 0

    def likelihood_params(self) -> int:
        """Parameters of p(x|z) per data value (1 for a model without a decoder likelihood): with data_shape, what
        one sample of one example costs the evaluator's memory."""
        return 1

    def log_weights_sampler(self, x: Tensor) -> Callable[[int], Tensor]:
        """n -> [n, B] log weights (ImportanceWeighted models); models override it to encode x only once."""
        return lambda n: self.log_weights(x, n)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Mean and variance of q(z|x) (Encoder models); the variance is None where the model has none."""
        return self.encode(x), None

    @property
    def device(self) -> torch.device:
        tensor = next(self.parameters(), None)
        tensor = tensor if tensor is not None else next(self.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")


@runtime_checkable
class LowerBounded(Protocol):
    def elbo(self, x: Tensor, n_samples: int = 1) -> ELBOTerms: ...


@runtime_checkable
class ExactLikelihood(Protocol):
    def log_prob(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class ImportanceWeighted(Protocol):
    def log_weights(self, x: Tensor, k: int) -> Tensor: ...


@runtime_checkable
class ImportanceSampled(Protocol):
    def importance_samples(self, x: Tensor, k: int, detach_posterior_params: bool = False) -> Any: ...


@runtime_checkable
class Encoder(Protocol):
    def encode(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Reconstructs(Protocol):
    def reconstruct(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Hierarchical(Protocol):
    def encode_levels(self, x: Tensor) -> dict[str, Tensor]: ...


@runtime_checkable
class LevelBounds(Protocol):
    """Hierarchical VAEs: the bound L^{>k} with the k levels next to x drawn from their prior (Havtorn et al. 2021)."""

    def log_weights_above_sampler(self, x: Tensor, k: int) -> Callable[[int], Tensor]: ...


@runtime_checkable
class SingleLatentDecoder(Protocol):
    """decode(z) -> likelihood parameters, likelihood.mean(params) -> an image: latent interpolations."""

    likelihood: Any

    def decode(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class Tightenable(Protocol):
    def posterior_params(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor: ...

    def encoder_parameters(self) -> list[nn.Parameter]: ...


@runtime_checkable
class DataInitialized(Protocol):
    """Models with a data-dependent initialization before gradient training."""

    def initialize_from_data(self, x: Tensor) -> None: ...


@runtime_checkable
class ClosedFormFit(Protocol):
    """Models fitted by fit() (those built with trains_by_gradient False; the linear model either way)."""

    def fit(self, x: Tensor, callback: Callback | None = None) -> list[dict]: ...


def register_model(name: str, config_class: type):
    """Class decorator: make a model buildable by name from its config."""

    def decorate(cls: type[LatentVariableModel]) -> type[LatentVariableModel]:
        cls.name = name
        cls.config_class = config_class
        MODELS[name] = cls
        return cls

    return decorate


def model_class(name: str) -> type[LatentVariableModel]:
    if not isinstance(name, str) or name not in MODELS:
        raise ElboxError(
            f"unknown model {str(name)[:60]!r}; available: {', '.join(sorted(MODELS))} (a model of your own "
            "is known once the module that registers it with @register_model is imported)"
        )
    return MODELS[name]


def model_config(name: str, values: dict[str, Any], version: int = CONFIG_VERSION) -> Any:
    """A model's config dataclass from JSON values written by run-config format `version` (by default the current
    one), upgraded by the model's upgrade_config."""
    cls = model_class(name)
    if not isinstance(values, dict):
        return config_from_dict(cls.config_class, values, f"{name} model config")
    values = cls.upgrade_config(values, version)
    config_class = cls.config_class_for(values)
    for key in values.keys() - config_class.__dataclass_fields__.keys():
        if home := cls.variants_with(key):
            raise ElboxError(f"{key} is an option of {home}, not of this {name} ({config_class.__name__})")
    return config_from_dict(config_class, values, f"{name} model config")


def build_model(name: str, config: dict[str, Any] | Any, **modules: nn.Module) -> LatentVariableModel:
    """Build a registered model from a config dataclass or its JSON dict (and the user-written networks it names),
    after checking that its parameters fit in this machine's memory."""
    cls = model_class(name)
    if isinstance(config, dict):
        config = model_config(name, config)
    check_model_size(cls, config, **modules)
    return cls.from_config(config, **modules) if modules else cls.from_config(config)


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine; None where the system does not say (Windows)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_model_size(cls: type[LatentVariableModel], config: Any, **modules: nn.Module) -> None:
    """ElboxError when the model's parameters and buffers, at 4 bytes each, exceed this machine's physical memory:
    counted on the meta device, which allocates nothing."""
    memory = physical_memory()
    if memory is None:
        return
    try:
        with torch.device("meta"):
            model = cls.from_config(config, **modules) if modules else cls.from_config(config)
    except Exception:  # not buildable on the meta device (or without its user-written networks): the real build decides
        return
    count = sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))
    if 4 * count > memory:
        raise ElboxError(
            f"the {cls.name} model config asks for {count:,} parameters ({4 * count / 2**30:,.1f} GiB), "
            f"more than this machine's memory ({memory / 2**30:,.1f} GiB)"
        )


def check_data_shape(data_shape: Sequence[int]) -> None:
    """ElboxError unless data_shape names a dimension and MAX_DATA_SIZE values at most (its declaration,
    DATA_SHAPE_LIMITS, bounds each dimension and their number)."""
    if not data_shape:
        raise ElboxError("data_shape must name at least one dimension")
    if math.prod(data_shape) > MAX_DATA_SIZE:
        raise ElboxError(
            f"data_shape {short_repr(tuple(data_shape))} has {math.prod(data_shape):,} values per example; "
            f"at most {MAX_DATA_SIZE:,} are supported"
        )


def check_image_shape(data_shape: Sequence[int], what: str) -> None:
    """ElboxError unless data_shape is an image's (channels, height, width): for the models that take images only."""
    if len(data_shape) != 3:
        hint = f"; vectors (D,) go to {VECTOR_MODELS}" if len(data_shape) == 1 else ""
        raise ElboxError(
            f"{what} takes images: data_shape must be (channels, height, width), got {tuple(data_shape)}{hint}"
        )


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
