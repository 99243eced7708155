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

from elbox.core.bounds import diag_gaussian_mixture_density

# float32 elements per sample and component of the log density: two float64 [K] tables (activation_elements); with
# 2**20-element passes the hvae-vamp row's IWAE runs about 500 samples a pass, measured faster than about 200 (10 per
# component) or 1300 (the decoder's size alone): benchmarks/reproduce/README.md, stop 39
VAMP_ELEMENTS_PER_COMPONENT = 4
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

    def log_prob(self, posterior: Posterior, z: Tensor) -> Tensor:
        """log p(z) [*batch] for z [*batch, d]: the equal-weight mixture of posterior(u_k)."""
        return self.density(posterior)(z)

    def density(self, posterior: Posterior) -> Callable[[Tensor], Tensor]:
        """z -> log p(z), with posterior(u_k) computed once: for the many passes of an importance-sampling stream
        under the same weights (encoding the 500 pseudo-inputs costs as much as 500 importance samples)."""
        return diag_gaussian_mixture_density(*posterior(self.inputs()))

    def sample(self, posterior: Posterior, n: int, temperature: float = 1.0) -> Tensor:
        """n draws [n, d] (draw_from_components)."""
        return draw_from_components(*posterior(self.inputs()), n, temperature)

    def activation_elements(self) -> int:
        """Per-sample elements of the log density, in float32 units: its float64 [K] table of component densities
        and logsumexp's float64 [K] temporary (diag_gaussian_mixture_density)."""
        return VAMP_ELEMENTS_PER_COMPONENT * self.weights.shape[0]


def draw_from_components(mean: Tensor, std: Tensor, n: int, temperature: float) -> Tensor:
    """n draws [n, d] of an equal-weight mixture of diagonal Gaussians [K, d]: a component k uniformly, then
    z ~ N(mean_k, (temperature * std_k)^2)."""
    k = torch.randint(0, mean.shape[0], (n,), device=mean.device)
    return mean[k] + temperature * std[k] * torch.randn_like(mean[k])
