"""The HVAE's configuration: the options of every type (markov, ladder, mlp-ladder, skip, conv-skip), their
defaults and checks. elbox.models.hvae builds the model from it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from elbox.core.errors import ElboxError
from elbox.core.nets import GATED, MLP_ACTIVATIONS, WEIGHT_INITS, check_logvar_bounds
from elbox.core.options import check_options, option, option_specs, short_repr
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
SKIP_TYPES = ("skip", "conv-skip")
DEFAULT_HVAE_TYPE = "markov"
# the options each type reads (the others must keep their defaults, so that none is silently ignored)
TYPE_OPTIONS = {
    "markov": {"latent_dims", "hidden_dims", "activation", "top_prior", "pseudo_inputs"},
    "mlp-ladder": {"latent_dims", "hidden_dims", "activation", "blocks_per_level", "posterior"},
    "ladder": {"channels", "latent_channels", "blocks_per_level", "level_downsample", "posterior"},
    "skip": {"latent_dims", "hidden_dims", "activation", "top_prior", "pseudo_inputs", "logvar_bounds", "weight_init"},
    "conv-skip": {
        "latent_dims",
        "hidden_dims",
        "activation",
        "top_prior",
        "pseudo_inputs",
        "logvar_bounds",
        "weight_init",
    },
}
SKIP_DEFAULTS = {"latent_dims": [40, 40], "hidden_dims": [300], "activation": "gated"}  # Tomczak & Welling 2018
POSTERIORS = ("residual", "precision")
TOP_PRIORS = ("standard", "vamp")
DEFAULT_PSEUDO_INPUTS = 100
# configs saved before the per-type defaults record hidden_dims [512] and activation relu for every type
LEGACY_DEFAULTS = {"hidden_dims": [512], "activation": "relu"}
# the Markov chain's MLPs train better with GELU than ReLU (benchmarks/results/summary.md); the MLP ladder was measured
# with ReLU only
DEFAULT_ACTIVATION = {"markov": "gelu", "mlp-ladder": "relu", "skip": "gated", "conv-skip": "gated"}


@dataclass
class HVAEConfig(LikelihoodOptions):
    data_shape: tuple[int, ...] = option(
        (1, 28, 28), "shape of one example (channels, height, width)", **DATA_SHAPE_LIMITS
    )
    hvae_type: str = option(
        DEFAULT_HVAE_TYPE,
        "markov (bottom-up MLP chain), ladder (top-down, convolutional), mlp-ladder "
        "(top-down, fully connected), skip (2 levels with skip paths: q(z2|x), "
        "q(z1|x,z2), p(z1|z2), p(x|z1,z2), Tomczak & Welling 2018) or conv-skip (the same "
        "with gated convolutions on x)",
        choices=HVAE_TYPES,
    )
    levels: int | None = option(
        None,
        "number of latent levels (default: 2 for markov, 3 for the ladders)",
        minimum=1,
        maximum=MAX_DEPTH,
        metavar="T",
    )
    activation: str | None = option(
        None,
        "markov, mlp-ladder and skip: activation of the MLPs (default: gelu for markov, "
        "relu for mlp-ladder, gated (gated dense layers) for skip; the convolutional "
        "ladder's residual blocks use GELU)",
        choices=MLP_ACTIVATIONS,
    )
    min_std: float = option(1e-4, "floor on every standard deviation", above=0)
    latent_dims: list[int] = option(
        help="markov and mlp-ladder: latent size per level z_1, z_2, ... (markov: z_1 is "
        "next to x; mlp-ladder: z_1 is the top level); default 32 next to x, halving "
        "per level up, at least 2",
        factory=list,
        minimum=1,
        maximum=MAX_WIDTH,
        max_items=MAX_DEPTH,
        metavar="D",
    )
    hidden_dims: list[int] | None = option(
        None,
        "markov: widths of every MLP transition (default: 512 512); "
        "mlp-ladder: widths of the bottom-up MLP from x, the last one that of "
        "the features, the top-down state and the residual blocks (default: 512)",
        minimum=1,
        maximum=MAX_WIDTH,
        metavar="H",
    )
    channels: int = option(
        64, "ladder: width of the bottom-up and top-down residual state", minimum=1, maximum=MAX_WIDTH
    )
    latent_channels: int = option(8, "ladder: channels of each level's latent map", minimum=1, maximum=MAX_WIDTH)
    blocks_per_level: int = option(
        1,
        "ladders: residual blocks after each level (top-down) and per resolution (bottom-up; per level for mlp-ladder)",
        minimum=1,
        maximum=MAX_DEPTH,
    )
    level_downsample: list[int] = option(
        help="ladder: per level, top first, image size / latent map size (default: top half 4, rest 2)",
        factory=list,
        minimum=1,
        maximum=MAX_DATA_SIZE,
        max_items=MAX_DEPTH,
        metavar="F",
    )
    posterior: str = option(
        "residual", "ladders: residual (NVAE) or precision-weighted (LVAE) posterior", choices=POSTERIORS
    )
    top_prior: str = option(
        "standard",
        "markov and skip: prior of the top level, standard (N(0, I)) or vamp (VampPrior: a mixture "
        "of the top posteriors at learned pseudo-inputs)",
        choices=TOP_PRIORS,
    )
    pseudo_inputs: int = option(
        DEFAULT_PSEUDO_INPUTS,
        "--top-prior vamp: number of pseudo-inputs (mixture "
        "components); each training step also runs them through the encoder chain",
        minimum=1,
        maximum=MAX_WIDTH,
        metavar="K",
    )
    logvar_bounds: list[float] | None = option(
        None,
        "skip: bound every log-variance to [LOW, HIGH] with a hardtanh "
        "(the VampPrior papers use -6 2; default: std = softplus + min_std)",
        max_items=2,
        metavar="B",
    )
    weight_init: str = option(
        "default",
        "skip: initialization of the linear layers, default (PyTorch's) or he (N(0, 2 / fan_in))",
        choices=WEIGHT_INITS,
    )

    def __post_init__(self):
        check_options(self)
        check_data_shape(self.data_shape)
        check_image_shape(self.data_shape, "the hvae")
        self._check_options_of_other_types()
        if self.top_prior != "vamp" and self.pseudo_inputs != DEFAULT_PSEUDO_INPUTS:
            raise ElboxError(
                f"pseudo_inputs={self.pseudo_inputs} applies to top_prior 'vamp' only; set --top-prior vamp or drop it"
            )
        if self.levels is None:
            self.levels = 2 if self.hvae_type in ("markov", *SKIP_TYPES) else 3
        check_logvar_bounds(self.logvar_bounds)
        if self.activation == GATED and self.hvae_type == "mlp-ladder":
            raise ElboxError("the mlp-ladder's residual blocks take an activation function, not gated layers")
        if self.hvae_type in SKIP_TYPES:
            self._skip_defaults()
        elif self.hvae_type in ("markov", "mlp-ladder"):
            if self.activation is None:
                self.activation = DEFAULT_ACTIVATION[self.hvae_type]
            if self.hidden_dims is None:
                self.hidden_dims = [512, 512] if self.hvae_type == "markov" else [512]
            if not self.latent_dims:
                next_to_x_first = [max(2, 32 >> t) for t in range(self.levels)]
                self.latent_dims = next_to_x_first if self.hvae_type == "markov" else next_to_x_first[::-1]
            if len(self.latent_dims) != self.levels:
                raise ElboxError(
                    f"latent_dims must give a size for each of the {self.levels} levels, got "
                    f"{short_repr(self.latent_dims)}"
                )
            if self.hvae_type == "mlp-ladder" and not self.hidden_dims:
                raise ElboxError(
                    "the mlp-ladder needs at least one hidden width (hidden_dims), the width of its features and state"
                )
        else:
            if not self.level_downsample:
                self.level_downsample = default_level_downsample(self.levels, self.data_shape)
            self._check_ladder_resolutions()

    def _skip_defaults(self) -> None:
        if self.levels != 2:
            raise ElboxError(f"the skip HVAE has 2 levels, got levels={self.levels}")
        for name, value in SKIP_DEFAULTS.items():
            if getattr(self, name) in (None, []):
                setattr(self, name, list(value) if isinstance(value, list) else value)
        if len(self.latent_dims) != 2 or len(self.hidden_dims) != 1:
            raise ElboxError(
                f"the skip HVAE takes latent_dims D1 D2 (z1 next to x) and one hidden width, got latent_dims "
                f"{short_repr(self.latent_dims)} and hidden_dims {short_repr(self.hidden_dims)}"
            )

    def _check_options_of_other_types(self) -> None:
        """Refuse an option of another type set away from its default (e.g. --channels for the mlp-ladder)."""
        others = set.union(*TYPE_OPTIONS.values()) - TYPE_OPTIONS[self.hvae_type]
        defaults = {spec.name: spec.default for spec in option_specs(HVAEConfig)}
        foreign = sorted(
            name for name in others if getattr(self, name) not in (defaults[name], LEGACY_DEFAULTS.get(name))
        )
        if foreign:
            uses = "; ".join(
                f"{name}: {' and '.join(t for t, names in TYPE_OPTIONS.items() if name in names)}" for name in foreign
            )
            raise ElboxError(
                f"hvae_type {self.hvae_type!r} does not use {', '.join(foreign)} ({uses}); "
                "choose the type with --hvae-type, or drop them"
            )

    def _check_ladder_resolutions(self) -> None:
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
        if any(a < b for a, b in zip(factors, factors[1:])):
            raise ElboxError(
                "level_downsample must not increase from the top level down (coarse to fine), got "
                f"{short_repr(factors)}"
            )


def default_level_downsample(levels: int, data_shape: Sequence[int]) -> list[int]:
    """The top ceil(T/2) levels at 1/4 of the image size, the rest at 1/2 (7x7 and 14x14 for 28x28);
    factors that do not divide the image size fall back to the largest power of 2 that does (at most 4)."""
    _, h, w = data_shape

    def divides(f: int) -> bool:
        return h % f == 0 and w % f == 0

    coarse = next(f for f in (4, 2, 1) if divides(f))
    fine = next(f for f in (2, 1) if divides(f))
    n_coarse = math.ceil(levels / 2)
    return [coarse] * n_coarse + [fine] * (levels - n_coarse)
