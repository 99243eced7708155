"""The likelihood options of a model config (LikelihoodOptions, declared once for the VAE and the HVAEs) and what a
model with such a likelihood shares (LikelihoodModel)."""

from __future__ import annotations

from dataclasses import dataclass

from elbox.core.errors import ElboxError
from elbox.core.options import option
from elbox.data.spaces import model_data_space
from elbox.models.likelihoods import LIKELIHOODS, Likelihood, build_likelihood


@dataclass
class LikelihoodOptions:
    """The likelihood options of a model config (VAEConfig and HVAEConfig subclass it; they have data_shape)."""

    likelihood: str = option(
        "bernoulli",
        "p(x|z); picks the data space: bernoulli, bernoulli-ar=binary (dynamic binarization), "
        "gaussian*=continuous (dequantized; vectors: real, standardized), "
        "discretized-logistic/categorical=8-bit",
        choices=tuple(LIKELIHOODS),
    )
    sigma: float = option(
        0.1, "standard deviation of the fixed-sigma gaussian likelihood", above=0, used_with={"likelihood": "gaussian"}
    )
    n_mixtures: int = option(
        1,
        "components of the discretized logistic mixture likelihood",
        minimum=1,
        used_with={"likelihood": "discretized-logistic"},
    )
    ar_channels: int = option(
        32,
        "hidden channels of the bernoulli-ar likelihood's masked convolution",
        minimum=1,
        used_with={"likelihood": "bernoulli-ar"},
    )
    ar_kernel: int = option(
        7,
        "window (odd) of the bernoulli-ar likelihood's masked convolution",
        minimum=3,
        used_with={"likelihood": "bernoulli-ar"},
    )

    def data_space(self) -> str:
        """The data space of the model's inputs: the likelihood's for images, 'real' for vectors (data_shape (D,)) with
        a gaussian likelihood; ElboxError for another likelihood on vectors (elbox.data.model_data_space)."""
        return model_data_space(
            LIKELIHOODS[self.likelihood].data_space, self.data_shape, f"the {self.likelihood} likelihood"
        )

    def build_likelihood(self) -> Likelihood:
        return build_likelihood(
            self.likelihood,
            self.data_shape,
            sigma=self.sigma,
            n_mixtures=self.n_mixtures,
            real=self.data_space() == "real",
            ar_channels=self.ar_channels,
            ar_kernel=self.ar_kernel,
        )


class LikelihoodModel:
    """Mixin of the models whose p(x|z) is a Likelihood in self.likelihood, built from LikelihoodOptions (the VAE
    and the HVAEs): what one decoded sample costs, and the config's older formats."""

    likelihood: Likelihood

    def likelihood_params(self) -> int:
        return self.likelihood.num_params

    @classmethod
    def upgrade_config(cls, values: dict, version: int) -> dict:
        return super().upgrade_config(upgrade_likelihood_options(values), version)


def upgrade_likelihood_options(values: dict) -> dict:
    """Config JSON of format version 1 kept the likelihood's options in a dict "likelihood_options"; they are
    fields of the model config now."""
    values = dict(values)
    options = values.pop("likelihood_options", {})
    if not isinstance(options, dict) or set(options) - {"sigma", "n_mixtures"}:
        raise ElboxError(f"likelihood_options must be a JSON object with sigma and/or n_mixtures, got {options!r}")
    return {**options, **values}
