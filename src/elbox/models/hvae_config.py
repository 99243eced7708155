"""The HVAE's configs, one per type (MarkovHVAEConfig, SkipHVAEConfig for skip and conv-skip, MLPLadderHVAEConfig,
LadderHVAEConfig): each holds only the options its type reads, with the type's real defaults and its training recipe;
`hvae_config_class(values)` picks the class from hvae_type. Every per-level list is given z1 (the level next to x)
first."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from elbox.core.errors import ElboxError
from elbox.core.nets import ACTIVATIONS, MLP_ACTIVATIONS, WEIGHT_INITS, check_logvar_bounds
from elbox.core.options import check_options, did_you_mean, option, short_repr
from elbox.models.base import (
    DATA_SHAPE_LIMITS,
    MAX_DATA_SIZE,
    MAX_DEPTH,
    MAX_WIDTH,
    check_data_shape,
    check_image_shape,
)
from elbox.models.likelihood_options import LikelihoodOptions

HVAE_TYPES = ("markov", "ladder", "mlp-ladder", "skip", "conv-skip")
# measured side by side, the same wall-clock on one thread each (benchmarks/results/hvae-default.md): skip 228.60 nats
# (IWAE-1000) in 32.9 min against the Markov chain's 229.03 in 34.8 min, 0.44 +- 0.03 nats better per test image
DEFAULT_HVAE_TYPE = "skip"
POSTERIORS = ("residual", "precision")
TOP_PRIORS = ("standard", "vamp")
# the training recipe measured for the HVAEs on binarized Fashion-MNIST (each type sets its epochs): cosine learning
# rate, EMA of the weights, 5-epoch linear KL warm-up; every level stays active without free bits
MEASURED_RECIPE = {
    "lr": 1e-3,
    "lr_schedule": "cosine",
    "ema_decay": 0.999,
    "beta_schedule": "linear",
    "warmup_epochs": 5.0,
}
TYPE_HELP = (
    "markov (bottom-up MLP chain), ladder (top-down, convolutional), mlp-ladder (top-down, fully connected), skip "
    "(skip paths: q(z2|x), q(z1|x,z2), p(z1|z2), p(x|z1,z2), Tomczak & Welling 2018; --levels adds levels above) or "
    "conv-skip (2 levels, with gated convolutions on x); each type has its own options: elbox train hvae "
    "--hvae-type TYPE --help"
)


def halving_latent_dims(levels: int) -> list[int]:
    """The default latent sizes, z1 first: 32 next to x, halving per level up, at least 2."""
    return [max(2, 32 >> t) for t in range(levels)]


@dataclass
class HVAEConfig(LikelihoodOptions):
    """What every HVAE type's config has. Build a type's own class (MarkovHVAEConfig, ...) or
    `hvae_config_class(values)(**values)`; this base class alone configures no model."""

    types: ClassVar[tuple[str, ...]] = ()  # the hvae_type values a class configures
    # {hvae_type: the TrainConfig values it trains with by default} (elbox.io.run_config.train_defaults); a type
    # without a measured recipe keeps the general defaults
    recipes: ClassVar[dict[str, dict[str, Any]]] = {}

    data_shape: tuple[int, ...] = option(
        (1, 28, 28), "shape of one example (channels, height, width)", **DATA_SHAPE_LIMITS
    )
    hvae_type: str = option(DEFAULT_HVAE_TYPE, TYPE_HELP, choices=HVAE_TYPES)
    min_std: float = option(1e-4, "floor on every standard deviation", above=0)

    def __post_init__(self):
        if not self.types:
            raise ElboxError(
                "HVAEConfig is the base of the types' configs: build MarkovHVAEConfig, SkipHVAEConfig, "
                "MLPLadderHVAEConfig or LadderHVAEConfig, or hvae_config_class(values)(**values)"
            )
        check_options(self)
        if self.hvae_type not in self.types:
            raise ElboxError(
                f"{type(self).__name__} configures hvae_type {' or '.join(self.types)}, not {self.hvae_type!r}; "
                f"use {hvae_config_class({'hvae_type': self.hvae_type}).__name__}"
            )
        check_data_shape(self.data_shape)
        check_image_shape(self.data_shape, "the hvae")


def settle_latent_dims(config: MarkovHVAEConfig | MLPLadderHVAEConfig) -> None:
    """The default latent sizes where none are given; ElboxError unless there is one per level."""
    if not config.latent_dims:
        config.latent_dims = halving_latent_dims(config.levels)
    if len(config.latent_dims) != config.levels:
        raise ElboxError(
            f"latent_dims must give a size for each of the {config.levels} levels, got {short_repr(config.latent_dims)}"
        )


def latent_dims_option(factory, help: str, max_items: int = MAX_DEPTH) -> Any:
    return option(help=help, factory=factory, minimum=1, maximum=MAX_WIDTH, max_items=max_items, metavar="D")


def hidden_dims_option(widths: list[int], help: str) -> Any:
    return option(help=help, factory=lambda: list(widths), minimum=1, maximum=MAX_WIDTH, metavar="H")


def levels_option(default: int) -> Any:
    return option(default, "number of latent levels", minimum=1, maximum=MAX_DEPTH, metavar="T")


@dataclass
class TopPriorOptions:
    """The top level's prior, for the types with an MLP encoder of x (markov and skip)."""

    top_prior: str = option(
        "standard",
        "prior of the top level, standard (N(0, I)) or vamp (VampPrior: a mixture of the top posteriors at learned "
        "pseudo-inputs)",
        choices=TOP_PRIORS,
    )
    pseudo_inputs: int = option(
        100,
        "number of pseudo-inputs (mixture components); each training step also runs them through the encoder",
        minimum=1,
        maximum=MAX_WIDTH,
        metavar="K",
        used_with={"top_prior": "vamp"},
    )


@dataclass
class MarkovHVAEConfig(TopPriorOptions, HVAEConfig):
    """The Markovian (bottom-up) chain x -> z1 -> ... -> zT with MLP transitions."""

    types: ClassVar[tuple[str, ...]] = ("markov",)
    # measured on binarized Fashion-MNIST with the same hour of training as the other types (benchmarks/results/
    # summary.md, likelihood_fmnist.py: 229.67 nats, the mlp-ladder 230.79, the VAE 231.74)
    recipes: ClassVar[dict[str, dict[str, Any]]] = {"markov": {**MEASURED_RECIPE, "epochs": 140}}

    hvae_type: str = option("markov", TYPE_HELP, choices=HVAE_TYPES)
    levels: int = levels_option(2)
    latent_dims: list[int] = latent_dims_option(
        list, "latent size per level, z1 (next to x) first (default: 32 next to x, halving per level up, at least 2)"
    )
    hidden_dims: list[int] = hidden_dims_option([512, 512], "widths of every MLP transition")
    # GELU trains the chain's MLPs better than ReLU (benchmarks/results/summary.md)
    activation: str = option("gelu", "activation of the MLPs (gated: gated dense layers)", choices=MLP_ACTIVATIONS)

    def __post_init__(self):
        super().__post_init__()
        settle_latent_dims(self)


@dataclass
class SkipHVAEConfig(TopPriorOptions, HVAEConfig):
    """The HVAE with skip paths of the VampPrior papers (Tomczak & Welling 2018), with an MLP (skip, any number of
    levels) or gated convolutions (conv-skip, 2 levels) on x; the papers' sizes. The default type."""

    types: ClassVar[tuple[str, ...]] = ("skip", "conv-skip")
    # skip: the Markov chain's recipe over the epochs that take as long (benchmarks/hvae_default.py); the papers' own
    # recipe (2000 epochs with early stopping) is benchmarks/reproduce/hvae.json. conv-skip (20 minutes an epoch on a
    # CPU core) keeps the general defaults
    recipes: ClassVar[dict[str, dict[str, Any]]] = {"skip": {**MEASURED_RECIPE, "epochs": 115}}

    hvae_type: str = option("skip", TYPE_HELP, choices=HVAE_TYPES)
    levels: int = option(2, "number of latent levels (conv-skip: 2)", minimum=2, maximum=MAX_DEPTH, metavar="T")
    latent_dims: list[int] = latent_dims_option(list, "latent size per level, z1 (next to x) first (default: 40 each)")
    hidden_dims: list[int] = hidden_dims_option([300], "the hidden width of every network")
    activation: str = option("gated", "activation (gated: gated dense layers)", choices=MLP_ACTIVATIONS)
    logvar_bounds: list[float] | None = option(
        None,
        "bound every log-variance to [LOW, HIGH] with a hardtanh (the VampPrior papers use -6 2); none: std = "
        "softplus + min_std",
        max_items=2,
        metavar="B",
    )
    weight_init: str = option(
        "default",
        "initialization of the linear layers, default (PyTorch's) or he (N(0, 2 / fan_in))",
        choices=WEIGHT_INITS,
    )

    def __post_init__(self):
        super().__post_init__()
        check_logvar_bounds(self.logvar_bounds)
        if self.hvae_type == "conv-skip" and self.levels != 2:
            raise ElboxError(f"the conv-skip HVAE has 2 levels, got levels {self.levels}")
        self.latent_dims = self.latent_dims or [40] * self.levels
        if len(self.latent_dims) != self.levels or len(self.hidden_dims) != 1:
            raise ElboxError(
                f"the skip HVAE takes a latent size per level ({self.levels}: z1 next to x first) and one hidden "
                f"width, got latent_dims {short_repr(self.latent_dims)} and hidden_dims "
                f"{short_repr(self.hidden_dims)}"
            )


@dataclass
class LadderOptions:
    """What both top-down ladders have: residual blocks and the posterior's form."""

    blocks_per_level: int = option(
        1,
        "residual blocks after each level (top-down) and per resolution (bottom-up; per level for mlp-ladder)",
        minimum=1,
        maximum=MAX_DEPTH,
    )
    posterior: str = option("residual", "residual (NVAE) or precision-weighted (LVAE) posterior", choices=POSTERIORS)


@dataclass
class MLPLadderHVAEConfig(LadderOptions, HVAEConfig):
    """The fully connected top-down ladder."""

    types: ClassVar[tuple[str, ...]] = ("mlp-ladder",)
    # as the markov recipe (same hour of training); batch 256 keeps the ladder's matrix products near the CPU's rate
    recipes: ClassVar[dict[str, dict[str, Any]]] = {
        "mlp-ladder": {**MEASURED_RECIPE, "epochs": 75, "batch_size": 256, "lr": 2e-3}
    }

    hvae_type: str = option("mlp-ladder", TYPE_HELP, choices=HVAE_TYPES)
    levels: int = levels_option(3)
    latent_dims: list[int] = latent_dims_option(
        list, "latent size per level, z1 (next to x) first (default: 32 next to x, halving per level up, at least 2)"
    )
    hidden_dims: list[int] = hidden_dims_option(
        [512],
        "widths of the bottom-up MLP from x, the last one that of the features, the top-down state and the "
        "residual blocks",
    )
    # measured with ReLU only; residual blocks take an activation function, not gated layers
    activation: str = option("relu", "activation of the MLPs", choices=ACTIVATIONS)

    def __post_init__(self):
        super().__post_init__()
        settle_latent_dims(self)
        if not self.hidden_dims:
            raise ElboxError(
                "the mlp-ladder needs at least one hidden width (hidden_dims), the width of its features and state"
            )


@dataclass
class LadderHVAEConfig(LadderOptions, HVAEConfig):
    """The convolutional top-down ladder (the general training defaults)."""

    types: ClassVar[tuple[str, ...]] = ("ladder",)

    hvae_type: str = option("ladder", TYPE_HELP, choices=HVAE_TYPES)
    levels: int = levels_option(3)
    channels: int = option(64, "width of the bottom-up and top-down residual state", minimum=1, maximum=MAX_WIDTH)
    latent_channels: int = option(8, "channels of each level's latent map", minimum=1, maximum=MAX_WIDTH)
    level_downsample: list[int] = option(
        help="per level, z1 (next to x) first, image size / latent map size (default: 2 for the lower half of the "
        "levels, 4 above)",
        factory=list,
        minimum=1,
        maximum=MAX_DATA_SIZE,
        max_items=MAX_DEPTH,
        metavar="F",
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.level_downsample:
            self.level_downsample = default_level_downsample(self.levels, self.data_shape)
        self._check_resolutions()

    def _check_resolutions(self) -> None:
        factors, (_, h, w) = self.level_downsample, self.data_shape
        if len(factors) != self.levels:
            raise ElboxError(
                f"level_downsample must give one factor per level ({self.levels}), got {short_repr(factors)}"
            )
        for f in factors:
            if f < 1 or f & (f - 1) or h % f or w % f:
                raise ElboxError(
                    f"level_downsample factors must be powers of 2 that divide the image size {h}x{w}, got "
                    f"{short_repr(factors)}"
                )
        if any(a > b for a, b in zip(factors, factors[1:])):
            raise ElboxError(
                f"level_downsample must not decrease from z1 (next to x) up (fine to coarse), got {short_repr(factors)}"
            )


def default_level_downsample(levels: int, data_shape: Sequence[int]) -> list[int]:
    """z1 first: the lower floor(T/2) levels at 1/2 of the image size, the rest at 1/4 (14x14 and 7x7 for 28x28);
    factors that do not divide the image size fall back to the largest power of 2 that does (at most 4)."""
    _, h, w = data_shape

    def divides(f: int) -> bool:
        return h % f == 0 and w % f == 0

    coarse = next(f for f in (4, 2, 1) if divides(f))
    fine = next(f for f in (2, 1) if divides(f))
    n_coarse = math.ceil(levels / 2)
    return [fine] * (levels - n_coarse) + [coarse] * n_coarse


HVAE_CONFIGS: dict[str, type[HVAEConfig]] = {
    t: cls for cls in (MarkovHVAEConfig, SkipHVAEConfig, MLPLadderHVAEConfig, LadderHVAEConfig) for t in cls.types
}


def hvae_config_class(values: dict[str, Any]) -> type[HVAEConfig]:
    """The config class of the type values["hvae_type"] names (the default type when it names none)."""
    hvae_type = values.get("hvae_type", DEFAULT_HVAE_TYPE)
    if hvae_type not in HVAE_CONFIGS:
        raise ElboxError(
            f"unknown hvae_type {short_repr(hvae_type)}; {did_you_mean(hvae_type, HVAE_TYPES)}"
            f"choose one of {', '.join(HVAE_TYPES)}"
        )
    return HVAE_CONFIGS[hvae_type]


def upgrade_hvae_config(values: dict[str, Any], version: int) -> dict[str, Any]:
    """The JSON values of a config written by an older format as the type's config reads them. Before version 3 one
    config held every type's options (those of other types at their defaults) and the ladders listed their levels
    top first."""
    if version >= 3:
        return values
    config_class = hvae_config_class(values)
    values = {k: v for k, v in values.items() if k in config_class.__dataclass_fields__}
    for name in ("latent_dims", "level_downsample"):
        if config_class in (MLPLadderHVAEConfig, LadderHVAEConfig) and isinstance(values.get(name), list):
            values[name] = values[name][::-1]
    return values
