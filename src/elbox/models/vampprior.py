"""The VampPrior (Tomczak & Welling 2018): p(z) = (1/K) sum_k q(z | u_k), the mixture of the encoder's Gaussian
posteriors at K learned pseudo-inputs u_k, shared by the VAE (--prior vamp) and the skip HVAE's top level.

Each pseudo-input is u_k = hardtanh(w_k, 0, 1), so it is always an image with values in [0, 1], as the data are; w_k
starts at N(0.05, 0.01^2) per value (the paper's), or at N(0, 2/K) under He initialization (what the Exemplar VAE code
effectively runs: its He initialization of every linear layer reaches the pseudo-inputs' layer too, so about half the
pseudo-pixels start clipped at 0). The encoder runs on the pseudo-inputs at every evaluation of the prior, with
gradients, so they are learned with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

Posterior = Callable[[Tensor], tuple[Tensor, Tensor]]  # images [K, *data_shape] -> (mean, std) [K, d]


class VampPrior(nn.Module):
    def __init__(self, components: int, data_shape: tuple[int, ...], weight_init: str = "default"):
        super().__init__()
        std = math.sqrt(2.0 / components) if weight_init == "he" else 0.01
        mean = 0.0 if weight_init == "he" else 0.05
        self.weights = nn.Parameter(mean + std * torch.randn(components, *data_shape))

    def inputs(self) -> Tensor:
        """The pseudo-inputs u_k [K, *data_shape], each value in [0, 1]."""
        return nn.functional.hardtanh(self.weights, 0.0, 1.0)

    def distribution(self, posterior: Posterior) -> MixtureSameFamily:
        """p(z) as a torch distribution over [d]: the mixture of posterior(u_k) with equal weights."""
        mean, std = posterior(self.inputs())
        # no argument validation: a non-finite draw must reach the trainer's non-finite step counting, not raise here
        weights = Categorical(
            logits=torch.zeros(mean.shape[0], device=mean.device, dtype=mean.dtype), validate_args=False
        )
        components = Independent(Normal(mean, std, validate_args=False), 1, validate_args=False)
        return MixtureSameFamily(weights, components, validate_args=False)

    def sample(self, posterior: Posterior, n: int, temperature: float = 1.0) -> Tensor:
        """n draws [n, d]: a component k uniformly, then z ~ N(mean_k, (temperature * std_k)^2)."""
        mean, std = posterior(self.inputs())
        k = torch.randint(0, mean.shape[0], (n,), device=mean.device)
        return mean[k] + temperature * std[k] * torch.randn_like(mean[k])

    def activation_elements(self, latent_dim: int) -> int:
        """Per-sample elements of the log density: [K, d] and its temporaries."""
        return 3 * self.weights.shape[0] * latent_dim
