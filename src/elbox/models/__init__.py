"""Models. Importing this package registers every model class in `MODELS`."""

from elbox.models.base import MODELS, LatentVariableModel, build_model, register_model
from elbox.models.diffusion import DiffusionConfig, DiffusionModel
from elbox.models.gaussian import GaussianConfig, GaussianModel
from elbox.models.hvae import HVAE, HVAEConfig
from elbox.models.hvae_config import LadderHVAEConfig, MarkovHVAEConfig, MLPLadderHVAEConfig, SkipHVAEConfig
from elbox.models.ladder import LadderHVAE, MLPLadderHVAE
from elbox.models.linear import LinearGaussian, LinearGaussianConfig
from elbox.models.markov_hvae import MarkovHVAE
from elbox.models.mixture import GaussianMixture, MixtureConfig
from elbox.models.skip_hvae import ConvSkipHVAE, SkipHVAE
from elbox.models.vae import VAE, VAEConfig

__all__ = [
    "MODELS",
    "LatentVariableModel",
    "build_model",
    "register_model",
    "VAE",
    "VAEConfig",
    "LinearGaussian",
    "LinearGaussianConfig",
    "GaussianModel",
    "GaussianConfig",
    "GaussianMixture",
    "MixtureConfig",
    "HVAE",
    "HVAEConfig",
    "MarkovHVAEConfig",
    "SkipHVAEConfig",
    "MLPLadderHVAEConfig",
    "LadderHVAEConfig",
    "MarkovHVAE",
    "LadderHVAE",
    "MLPLadderHVAE",
    "SkipHVAE",
    "ConvSkipHVAE",
    "DiffusionModel",
    "DiffusionConfig",
]
