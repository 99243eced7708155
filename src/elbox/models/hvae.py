"""Hierarchical VAEs with T latent levels: the base HVAE, which builds the type its config names (configs:
elbox.models.hvae_config) and the model interface they share. The types: the 2-level HVAE with skip paths
(hvae_type="skip", the default, and "conv-skip"; elbox.models.skip_hvae), the Markovian chain (hvae_type="markov";
elbox.models.markov_hvae) and the top-down ladders (elbox.models.ladder: convolutional "ladder", fully connected
"mlp-ladder").

Markovian HVAE (Luo 2022, "Understanding Diffusion Models: A Unified Perspective", §Hierarchical Variational
Autoencoders; the bottom-up "VAE" baseline of Sønderby et al. 2016, LVAE), MLP transitions:
    p(x, z_1..T) = p(z_T) prod_{t=2}^T p(z_{t-1}|z_t) p(x|z_1),   p(z_T) = N(0, I)
    q(z_1..T|x)  = q(z_1|x) prod_{t=2}^T q(z_t|z_{t-1})
  z_1 is the level next to the data. q(z_t|z_{t-1}) and p(z_t|z_{t+1}) are densities over z_t with
  different conditioning, so they cannot be paired into an analytic KL: level t < T contributes the
  single-sample estimate log q(z_t|z_{t-1}) - log p(z_t|z_{t+1}); the top level's KL(q(z_T|z_{T-1}) || N(0, I))
  is analytic.
  top_prior="vamp" replaces N(0, I) by a VampPrior (Tomczak & Welling 2018): p(z_T) = (1/K) sum_k
  N(z_T; m_k, diag s_k^2), where (m_k, s_k) is the top posterior reached along the chain of posterior means from
  a learned pseudo-input u_k (q(z_1|u_k), q(z_2|E z_1), ...). The top level's KL term is then the single-sample
  log q(z_T|z_{T-1}) - log p(z_T) too.

Every type: ELBOTerms.kl has one entry per level ("z1" next to x, ..., "zT" at the top); log_weights gives IWAE-K;
sample() takes a temperature per level, z1 first (the standard deviations of p(z_l|.) are scaled by it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from elbox.core.bounds import ELBOTerms, ImportanceSamples, check_count
from elbox.core.errors import ElboxError
from elbox.core.options import option_specs
from elbox.models.base import LatentVariableModel, per_level_temperatures, register_model
from elbox.models.hvae_config import DEFAULT_HVAE_TYPE, HVAE_CONFIGS, HVAEConfig, hvae_config_class, upgrade_hvae_config
from elbox.models.likelihood_options import LikelihoodModel


@register_model("hvae", HVAEConfig)
class HVAE(LikelihoodModel, LatentVariableModel, ABC):
    """Hierarchical VAE: builds the subclass registered for the config's hvae_type (MarkovHVAE, the ladders, the skip
    HVAEs). A subclass implements the abstract methods below; the model interface (elbo, log weights, IWAE samples,
    LLR bounds, encodings, samples) is built on them here."""

    hvae_type: ClassVar[str] = ""
    types: ClassVar[dict[str, type[HVAE]]] = {}
    detachable_posterior = False  # q(z_l|.) depends on the draws below it: no STL or DReG (see log_weights_sampler)

    @classmethod
    def config_class_for(cls, values: dict[str, Any]) -> type[HVAEConfig]:
        return hvae_config_class(values)

    @classmethod
    def config_classes(cls) -> tuple[type, ...]:
        return tuple(dict.fromkeys(HVAE_CONFIGS.values()))

    @classmethod
    def variants_with(cls, name: str) -> str | None:
        types = [t for t, config in HVAE_CONFIGS.items() if any(s.name == name and s.cli for s in option_specs(config))]
        return f"hvae_type {' or '.join(types)}" if types else None

    @classmethod
    def training_defaults(cls, model_values: dict[str, Any]) -> dict[str, Any]:
        hvae_type = model_values.get("hvae_type") or DEFAULT_HVAE_TYPE
        return dict(hvae_config_class(model_values).recipes.get(hvae_type, {}))

    @classmethod
    def upgrade_config(cls, values: dict[str, Any], version: int) -> dict[str, Any]:
        values = super().upgrade_config(values, version)
        return upgrade_hvae_config(values, version)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.hvae_type:  # not the shared bases
            HVAE.types[cls.hvae_type] = cls

    def __init__(self, config: HVAEConfig):
        super().__init__(config)
        self.likelihood = config.build_likelihood()

    @classmethod
    def from_config(cls, config: HVAEConfig) -> HVAE:
        if config.hvae_type not in HVAE.types:  # the ladder registers when elbox.models (or .ladder) is imported
            raise ElboxError(f"no HVAE class for hvae_type {config.hvae_type!r}; import elbox.models")
        return HVAE.types[config.hvae_type](config)

    @property
    def data_space(self) -> str:
        return self.likelihood.data_space

    @property
    def level_names(self) -> list[str]:
        return [f"z{i}" for i in range(1, self.config.levels + 1)]

    # -- what each type implements -------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self, x: Tensor) -> Any:
        """What inference computes from x alone, once for any number of draws (bottom-up features, the parameters
        of the posterior's first level, ...): the `prepared` argument of draw and draw_above."""

    @abstractmethod
    def draw(self, prepared: Any, x: Tensor, n: int) -> Draws:
        """n joint draws z ~ q(z|x) per example: log p(x|z), each level's KL term and the log weights (Draws)."""

    @abstractmethod
    def draw_above(self, prepared: Any, x: Tensor, n: int, k: int) -> Tensor:
        """Log weights [n, B] of L^{>k}, 1 <= k <= T (see log_weights_above_sampler): the k levels next to x drawn
        from their conditional prior, the levels above from q."""

    @abstractmethod
    def level_moments(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Each level's posterior mean and variance {name: ([B, ...], [B, ...])}, the levels it depends on set to
        their posterior means."""

    @abstractmethod
    def decode_from_means(self, x: Tensor) -> Tensor:
        """The likelihood's parameters [B, P, *data_shape] at the posterior means of every level."""

    @abstractmethod
    def ancestral_params(self, n: int, temperatures: list[float]) -> Tensor:
        """The likelihood's parameters [n, P, *data_shape] at n ancestral draws z ~ p(z), top level first, each
        level's prior standard deviation scaled by its temperature (one per level, in level_names order)."""

    # -- the model interface -------------------------------------------------------------------------------------

    def elbo(self, x: Tensor, n_samples: int = 1) -> ELBOTerms:
        check_count(n_samples, "n_samples")
        return self._terms(self.draw(self.prepare(x), x, n_samples))

    def log_weights(self, x: Tensor, k: int, detach_posterior_params: bool = False) -> Tensor:
        return self.log_weights_sampler(x, detach_posterior_params)(k)

    def log_weights_sampler(self, x: Tensor, detach_posterior_params: bool = False) -> Callable[[int], Tensor]:
        """Run the x-only part of inference once; the returned function draws n log weights
        log p(x, z) - log q(z|x) [n, B].

        detach_posterior_params (the STL/DReG form) is refused: q(z_l|.) depends on the earlier draws z_<l, and
        detaching its parameters would also cut the gradient through z_<l, biasing the estimator."""
        _refuse_detached_posterior(detach_posterior_params)
        prepared = self.prepare(x)
        return lambda n: self.draw(prepared, x, n).log_w

    def log_weights_above_sampler(self, x: Tensor, k: int) -> Callable[[int], Tensor]:
        """For the log-likelihood ratio LLR^{>k} (Havtorn et al. 2021): a function drawing n log weights [n, B] of
        L^{>k}, the bound whose k levels next to x come from their conditional prior p(z_<=k|z_>k) and whose levels
        above k from q(z_>k|x): log p(x|z) + log p(z_>k) - log q(z_>k|x). k = 0 gives the ordinary log weights
        (the same draws for the same seed); k = T draws every level from the prior."""
        if not 0 <= k <= self.config.levels:
            raise ElboxError(f"k must be between 0 and the model's {self.config.levels} levels, got {k}")
        prepared = self.prepare(x)
        if k == 0:  # L^{>0} is the ordinary bound: draw()'s log weights, on the same draws
            return lambda n: self.draw(prepared, x, n).log_w
        return lambda n: self.draw_above(prepared, x, n, k)

    def importance_samples(self, x: Tensor, k: int, detach_posterior_params: bool = False) -> ImportanceSamples:
        """k joint draws per example with their log weights, for the IWAE training objective (the reparam
        estimator only, see log_weights_sampler). The terms average the reconstruction and each level's KL
        term over the k draws; z is None, since DReG, the one estimator that reweights the draws, is refused."""
        check_count(k, "the number of importance samples K")
        _refuse_detached_posterior(detach_posterior_params)
        draws = self.draw(self.prepare(x), x, k)
        return ImportanceSamples(log_w=draws.log_w, z=None, terms=self._terms(draws))

    def _terms(self, draws: Draws) -> ELBOTerms:
        """The ELBO's terms from draws: the reconstruction and each level's KL term averaged over them."""
        kl = {name: v.mean(0) for name, v in draws.kl.items()}
        return ELBOTerms(draws.log_px.mean(0), kl, inexact_kl=self.inexact_kl_terms)

    def encode_levels(self, x: Tensor) -> dict[str, Tensor]:
        """Each level's posterior mean {name: [B, d_l]} (see level_moments)."""
        return {name: mean for name, (mean, _) in self.level_moments(x).items()}

    def encode(self, x: Tensor) -> Tensor:
        """Posterior means of every level, flattened and concatenated [B, sum of level sizes]."""
        return torch.cat([m.flatten(1) for m in self.encode_levels(x).values()], dim=1)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior means and variances of every level, concatenated like encode(): ([B, d], [B, d])."""
        moments = self.level_moments(x).values()
        return torch.cat([m.flatten(1) for m, _ in moments], dim=1), torch.cat(
            [v.flatten(1) for _, v in moments], dim=1
        )

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.likelihood.mean(self.decode_from_means(x))

    def sample(self, n: int, mean: bool = True, temperature: float | Sequence[float] = 1.0) -> Tensor:
        """Ancestral sampling, top level first, with each level's prior standard deviation scaled by its
        temperature (one value for all levels or one per level). Returns the mean of p(x|z) or a draw."""
        check_count(n)
        params = self.ancestral_params(n, per_level_temperatures(temperature, self.config.levels))
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params)

    def _params_shape(self, flat: Tensor, batch: Sequence[int]) -> Tensor:
        c, h, w = self.config.data_shape
        return flat.reshape(*batch, self.likelihood.num_params, c, h, w)


class Draws(NamedTuple):
    """n joint draws z ~ q(z|x) per example, as HVAE.draw returns them."""

    log_px: Tensor  # [n, B] log p(x|z)
    kl: dict[str, Tensor]  # level name -> [n, B] (or [1, B] where it does not depend on the draw) the level's KL term
    log_w: Tensor  # [n, B] log weights log p(x, z) - log q(z|x)


def _refuse_detached_posterior(detach_posterior_params: bool) -> None:
    if detach_posterior_params:
        raise ElboxError(
            "the STL and DReG estimators are not available for hierarchical VAEs; use the reparam estimator"
        )


def _draw_like(mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """One reparameterized draw per row of already-sampled parameters: (z, eps), same shape as mean."""
    eps = torch.randn_like(mean)
    return mean + std * eps, eps
