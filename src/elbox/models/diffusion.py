"""Variational diffusion models (Kingma et al. 2021, "Variational Diffusion Models", VDM below): a Markovian
hierarchical VAE whose encoder is fixed noise. Equation numbers are those of the VDM paper.

Data are 8-bit images. The model takes elbox's "discrete" space x = k/255 and works on VDM's grid
    x = 2 (k + 1/2) / 256 - 1,  k in {0..255}.
Encoder (variance preserving, eq. (1)): q(z_t|x) = N(alpha_t x, sigma_t^2 I), t in [0, 1], with
    gamma(t) = -log SNR(t) increasing,  alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t))
(the noise schedules gamma: elbox.models.schedules). Generative model (eqs. (6)-(9)): z_1 ~ N(0, I), the steps
p(z_s|z_t) = q(z_s|z_t, x = x_hat(z_t; t)), and p(x|z_0) a 256-way categorical per pixel,
    p(x_i = k | z_0) = softmax_k(-1/2 e^{-gamma_0} (z_0i/alpha_0 - x_k)^2).
DiffusionModel.vlb computes the bound of eq. (11), L = L_recon + L_prior + L_diffusion, term by term, in nats per
example; elbo and elbo_for_evaluation are its Monte Carlo and (in discrete time) exact-sum forms.

The denoiser is a U-Net conditioned on the normalized log-SNR c = (gamma_t - gamma_min)/(gamma_max - gamma_min), not
on t, so the continuous-time loss depends on the schedule only through its endpoints (§5.1); the interior only
changes the estimator's variance. Its output is read in one of three parameterizations (PARAMETERIZATION_CLASSES:
noise eps, clean data x0, or the conditional score of q(z_t|x), -eps/sigma_t); they give the same ELBO for
equivalent predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from elbox.core.bounds import ELBOTerms, check_count
from elbox.core.errors import ElboxError
from elbox.core.nets import ConditionedUNet
from elbox.core.options import check_options, option
from elbox.models.base import (
    DATA_SHAPE_LIMITS,
    MAX_DEPTH,
    MAX_WIDTH,
    LatentVariableModel,
    check_data_shape,
    check_image_shape,
    register_model,
)
from elbox.models.diffusion_parts import (
    NUM_LEVELS,
    PARAMETERIZATION_CLASSES,
    PARAMETERIZATIONS,
    alpha_sigma,
    bin_indices,
    encode_8bit,
    window_half_width,
)
from elbox.models.schedules import SCHEDULES, build_schedule

DIFFUSION_LOSSES = ("elbo", "simple")
# Upper bound on elements of the [*, 256] logits of the categorical reconstruction computed at once.
MAX_LOGIT_ELEMENTS = 2**24
MAX_TIMESTEPS = 10**6
GAMMA_LIMIT = 30.0  # |gamma| bound: sigmoid(-30) = 9e-14, already below float32's resolution next to 1


@dataclass
class DiffusionConfig:
    data_shape: tuple[int, ...] = option(
        (1, 28, 28), "shape of one image (channels, height, width)", **DATA_SHAPE_LIMITS
    )
    timesteps: int = option(
        0,
        "number of steps T of the discrete-time model; 0 = continuous time",
        minimum=0,
        maximum=MAX_TIMESTEPS,
        metavar="T",
    )
    schedule: str = option("learned-linear", "noise schedule gamma(t) = -log SNR(t)", choices=SCHEDULES)
    gamma_min: float = option(
        -13.3, "gamma(0) (the initial value when learned)", minimum=-GAMMA_LIMIT, maximum=GAMMA_LIMIT
    )
    gamma_max: float = option(
        5.0, "gamma(1) (the initial value when learned)", minimum=-GAMMA_LIMIT, maximum=GAMMA_LIMIT
    )
    parameterization: str = option(
        "eps", "what the denoiser predicts: the noise (eps), the data (x0) or the score", choices=PARAMETERIZATIONS
    )
    loss: str = option(
        "elbo",
        "train on the ELBO, or on the simple unweighted noise-prediction loss (reports are always the ELBO)",
        choices=DIFFUSION_LOSSES,
        aliases=("--diffusion-loss",),
    )
    channels: list[int] = option(
        help="U-Net width per resolution level (each further level halves the image)",
        factory=lambda: [16, 32, 64],
        minimum=1,
        maximum=MAX_WIDTH,
        max_items=MAX_DEPTH,
        aliases=("--unet-channels",),
        metavar="C",
    )
    blocks_per_level: int = option(1, "U-Net residual blocks per resolution", minimum=1, maximum=MAX_DEPTH)
    fourier_features: bool = option(True, "feed Fourier features of z_t to the U-Net")

    def __post_init__(self):
        check_options(self)
        check_data_shape(self.data_shape)
        check_image_shape(self.data_shape, "the diffusion model")
        checks = [
            (self.gamma_min < self.gamma_max, f"need gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}"),
            (bool(self.channels), "channels must be a non-empty list of positive widths"),
            (
                not (self.loss == "simple" and self.schedule.startswith("learned")),
                f"the simple loss gives the {self.schedule} schedule no gradient that balances its endpoints; use a "
                "fixed schedule or the elbo loss",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ElboxError(message)


def _per_example(v: Tensor, ndim: int) -> Tensor:
    """[N] -> [N, 1, 1, ...] to broadcast against [N, *data_shape]."""
    return v.reshape(-1, *([1] * ndim))


@register_model("diffusion", DiffusionConfig)
class DiffusionModel(LatentVariableModel):
    """Variational diffusion model on 8-bit images (see the module docstring). No log_weights and no encoder:
    the ELBO is estimated over time (and summed exactly over steps in discrete time)."""

    def __init__(self, config: DiffusionConfig):
        super().__init__(config)
        self.trains_on_surrogate = config.loss == "simple"
        self.schedule = build_schedule(config.schedule, config.gamma_min, config.gamma_max, config.timesteps)
        self.parameterization = PARAMETERIZATION_CLASSES[config.parameterization]
        self.denoiser = ConditionedUNet(
            config.data_shape, config.channels, config.blocks_per_level, config.fourier_features
        )
        grid = (2 * torch.arange(NUM_LEVELS, dtype=torch.float32) + 1) / NUM_LEVELS - 1
        self.register_buffer("grid", grid, persistent=False)

    @property
    def data_space(self) -> str:
        return "discrete"

    # -- the bound: L = L_recon + L_prior + L_diffusion ------------------------------------------------------------

    def vlb(self, x: Tensor, n_samples: int = 1, timesteps: int | None = None, all_steps: bool = False) -> ELBOTerms:
        """The variational lower bound of 8-bit images x [N, *data_shape] (the discrete space), per example, term by
        term; VDM eq. (11) writes its negative, -VLB(x) = L_recon + L_prior + L_diffusion:

            VLB(x) = E_q(z_0|x)[log p(x|z_0)]   reconstruction, eq. (8), one z_0 per estimate (reconstruction_log_prob)
                   - KL(q(z_1|x) || p(z_1))      prior loss, analytic (prior_kl)
                   - L_T(x)  or  L_inf(x)        diffusion loss: T steps, eqs. (12)-(14); continuous time, eq. (17)

        timesteps: the T of the diffusion loss (default: the model's own; 0 = continuous time).
        all_steps False: the diffusion loss estimated at n_samples times per example (sample_times), one step or time
            each (diffusion_loss), each estimate with its own z_0; the estimates averaged.
        all_steps True (T >= 1): L_T summed exactly over its T steps (diffusion_sum), one noise draw each; one z_0.
        Returned as ELBOTerms(reconstruction, kl = {"prior", "diffusion"}). With loss="simple" (and not all_steps),
        ELBOTerms.objective is the training surrogate -(L_recon + L_prior + 1/2 ||eps - eps_hat||^2), the unweighted
        loss of Ho et al. 2020. The noise is drawn first, in the order that results under a fixed seed depend on:
        each estimate's time and z_t noise, then z_0's noise (then, with all_steps, each step's z_t noise)."""
        timesteps = self.config.timesteps if timesteps is None else timesteps
        if all_steps and timesteps < 1:
            raise ElboxError("the exact sum over steps needs a discrete-time model (timesteps >= 1)")
        n = 1 if all_steps else check_count(n_samples, "n_samples")
        batch, k, x_enc = x.shape[0], bin_indices(x), encode_8bit(x)
        x_rep = x_enc.expand(n, *x_enc.shape).reshape(-1, *x_enc.shape[1:])  # n estimates per example
        if not all_steps:
            t = self.sample_times(n, batch, x.device).reshape(-1)
            eps_t = torch.randn_like(x_rep)
        eps_0 = torch.randn_like(x_rep)
        # L_diffusion is built first (as it always was): the gradients that several terms send to one parameter (the
        # schedule's endpoints) are summed in the order the terms were built, and seeded training depends on it
        if all_steps:  # L_diffusion
            diffusion = self.diffusion_sum(x_enc, timesteps)
        else:
            loss, simple = self.diffusion_loss(x_rep, t, timesteps, eps_t)
            diffusion = loss.reshape(n, batch).mean(0)
        # L_recon
        recon = self.reconstruction_log_prob(x_rep, k.repeat(n, *([1] * (k.dim() - 1))), eps_0)
        reconstruction = recon.reshape(n, batch).mean(0)
        # L_prior
        prior = self.prior_kl(x_enc)
        objective = None
        if self.config.loss == "simple" and not all_steps:  # the training surrogate
            objective = reconstruction - prior - simple.reshape(n, batch).mean(0)
        return ELBOTerms(
            reconstruction=reconstruction, kl={"prior": prior, "diffusion": diffusion}, objective=objective
        )

    # -- L_recon: the categorical p(x|z_0) on encoded data x (any real values, so tests can use Gaussian data) ----

    def reconstruction_log_prob(self, x: Tensor, k: Tensor, eps: Tensor) -> Tensor:
        """log p(x|z_0) for z_0 = alpha_0 x + sigma_0 eps, minus the reconstruction loss of eq. (11): per pixel
        (eq. (8)), a 256-way softmax over the grid values x_k of -1/2 e^{-gamma_0} (z_0/alpha_0 - x_k)^2, with
        z_0/alpha_0 = x + e^{gamma_0/2} eps. k: bin indices.

        The softmax is sharp (at gamma_0 = -13.3 the grid spacing is 6 standard deviations), so it is computed over
        a window of grid values around u that holds all but e^-30 of the mass (window_half_width); the full 256
        values when the window would be as wide, or when a pixel's own bin falls outside it."""
        gamma_0, _ = self.schedule.endpoints()
        u = (x + torch.exp(0.5 * gamma_0) * eps).flatten(1)
        k = k.flatten(1)
        half = window_half_width(gamma_0.detach())
        if 2 * half + 1 < NUM_LEVELS:
            # window start per pixel: centred on u's nearest bin, shifted to stay inside [0, 255]
            nearest = ((u.detach() + 1) * (NUM_LEVELS / 2) - 0.5).round().long()
            start = (nearest - half).clamp(0, NUM_LEVELS - 2 * half - 1)
            if bool(((k >= start) & (k <= start + 2 * half)).all()):
                grid = self.grid[start[..., None] + torch.arange(2 * half + 1, device=u.device)]
                logits = -0.5 * torch.exp(-gamma_0) * (u[..., None] - grid).square()
                log_p = logits.gather(-1, (k - start)[..., None]).squeeze(-1) - logits.logsumexp(-1)
                return log_p.sum(-1)
        rows = max(1, MAX_LOGIT_ELEMENTS // (u.shape[1] * NUM_LEVELS))
        parts = []
        for s in range(0, u.shape[0], rows):
            logits = self.decoder_logits(u[s : s + rows], gamma_0)
            log_p = logits.gather(-1, k[s : s + rows, :, None]).squeeze(-1) - logits.logsumexp(-1)
            parts.append(log_p.sum(-1))
        return torch.cat(parts)

    def decoder_logits(self, u: Tensor, gamma_0: Tensor) -> Tensor:
        """Logits [..., 256] of p(x = k | z_0) for u = z_0/alpha_0: -1/2 e^{-gamma_0} (u - x_k)^2."""
        return -0.5 * torch.exp(-gamma_0) * (u[..., None] - self.grid).square()

    # -- L_prior --------------------------------------------------------------------------------------------------

    def prior_kl(self, x: Tensor) -> Tensor:
        """The prior loss of eq. (11), KL(q(z_1|x) || p(z_1)) with p(z_1) = N(0, I) (eq. (7)):
        1/2 sum_i (alpha_1^2 x_i^2 + sigma_1^2 - log sigma_1^2 - 1), per example."""
        _, gamma_1 = self.schedule.endpoints()
        alpha_sq, sigma_sq = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1)
        per_dim = 0.5 * (alpha_sq * x.square() + sigma_sq - F.logsigmoid(gamma_1) - 1)
        return per_dim.flatten(1).sum(-1)

    # -- L_diffusion ----------------------------------------------------------------------------------------------

    def sample_times(self, n: int, batch: int, device: torch.device) -> Tensor:
        """t [n, batch] with U(0, 1) marginals. Training: one stratified (antithetic) grid over all n*batch draws,
        t = (u + i/(n batch)) mod 1 (VDM's low-discrepancy sampler, App. I.1). Evaluation: each example gets its own u_b
        and t = (u_b + j/n) mod 1, so the per-example estimates are independent of each other."""
        if self.training:
            offsets = torch.arange(n * batch, device=device).reshape(n, batch) / (n * batch)
            return (torch.rand((), device=device) + offsets) % 1
        return (torch.rand(1, batch, device=device) + torch.arange(n, device=device)[:, None] / n) % 1

    def diffusion_loss(
        self, x: Tensor, t: Tensor, timesteps: int | None = None, eps: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Single-time estimates of the diffusion loss at times t [N] for encoded data x [N, *data_shape], with
        z_t = alpha_t x + sigma_t eps, eps ~ N(0, I) (drawn here unless given):

        continuous time (timesteps 0), L_inf of eq. (17):  1/2 gamma'(t) ||eps - eps_hat(z_t; t)||^2
        T steps, L_T of eq. (14):  at step i = floor(t T) + 1, t = i/T and s = (i-1)/T,
                                   T/2 (exp(gamma(t) - gamma(s)) - 1) ||eps - eps_hat(z_t; t)||^2,
                                   the sum over the T steps estimated by one of them.
        Returns (loss [N], simple [N]) where simple = 1/2 ||eps - eps_hat||^2 (the unweighted noise-prediction loss).
        """
        timesteps = self.config.timesteps if timesteps is None else timesteps
        if timesteps > 0:
            t = (torch.floor(t * timesteps) + 1).clamp(max=timesteps) / timesteps
        shape, slope = self.schedule.shape_and_slope(t)
        gamma_min, gamma_max = self.schedule.endpoints()
        gamma = gamma_min + (gamma_max - gamma_min) * shape
        eps = torch.randn_like(x) if eps is None else eps
        alpha, sigma = alpha_sigma(_per_example(gamma, x.dim() - 1))
        z = alpha * x + sigma * eps
        sq = self._squared_error(x, z, eps, gamma)
        if timesteps > 0:  # eq. (14): T (SNR(s)/SNR(t) - 1) = T expm1(gamma(t) - gamma(s))
            gamma_s = self.schedule(t - 1 / timesteps)
            weight = timesteps * torch.expm1(gamma - gamma_s)
        else:  # eq. (17): gamma'(t)
            weight = (gamma_max - gamma_min) * slope
        loss = 0.5 * weight * sq
        if self.schedule.interior_fits_variance and timesteps == 0 and self.training and loss.requires_grad:
            self._fit_interior_to_variance(loss, shape, slope)
        return loss, 0.5 * sq

    def diffusion_sum(self, x: Tensor, timesteps: int) -> Tensor:
        """L_T of eq. (12) for encoded data x: the sum over its T steps of each step's KL term, estimated with one
        noise draw each (diffusion_loss at the step, divided by T)."""
        total = torch.zeros(x.shape[0], device=x.device)
        for i in range(1, timesteps + 1):
            t = torch.full((x.shape[0],), (i - 0.5) / timesteps, device=x.device)
            total = total + self.diffusion_loss(x, t, timesteps)[0] / timesteps
        return total

    @staticmethod
    def _fit_interior_to_variance(loss: Tensor, shape: Tensor, slope: Tensor) -> None:
        """Replace the gradient reaching the schedule's interior (through shape(t) and shape'(t), which the other
        terms do not touch) by that of sum_i L_i^2 / (2 mean L): each example's gradient scaled by L_i / mean L.
        Its ELBO gradient is zero in expectation (the loss depends on the schedule only through its endpoints, VDM
        §5.1), so this lowers the estimator's variance without biasing the bound (VDM §5.3, App. I.2)."""
        scale = (loss / loss.mean()).detach()
        shape.register_hook(lambda g: g * scale)
        slope.register_hook(lambda g: g * scale)

    # -- the denoiser ---------------------------------------------------------------------------------------------

    def predict_eps(self, z: Tensor, gamma: Tensor) -> Tensor:
        """The denoiser's prediction read as noise eps_hat, for z_t [N, *data_shape] and gamma_t [N]."""
        out, alpha, sigma = self._denoise(z, gamma)
        return self.parameterization.eps_hat(out, z, alpha, sigma)

    def _denoise(self, z: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw denoiser output and alpha_t, sigma_t shaped to broadcast with z."""
        gamma_min, gamma_max = self.schedule.endpoints()
        cond = (gamma - gamma_min) / (gamma_max - gamma_min)
        alpha, sigma = alpha_sigma(_per_example(gamma, z.dim() - 1))
        return self.denoiser(z, cond) + self.skip(z, alpha), alpha, sigma

    def skip(self, z: Tensor, alpha: Tensor) -> Tensor:
        """Added to the denoiser's output so that, with the output layer at zero, each parameterization starts
        from a sensible guess (see its `skip`)."""
        return self.parameterization.skip(z, alpha)

    def _squared_error(self, x: Tensor, z: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
        """Per-example ||eps - eps_hat||^2, computed in the parameterization's own space: for x0,
        SNR_t ||x - x_hat||^2; for the score, ||eps + sigma_t s_hat||^2 (the same quantity, exactly)."""
        out, alpha, sigma = self._denoise(z, gamma)
        return self.parameterization.eps_error(out, x, eps, alpha, sigma).flatten(1).square().sum(-1)

    # -- the model interface --------------------------------------------------------------------------------------

    def elbo(self, x: Tensor, n_samples: int = 1) -> ELBOTerms:
        """ELBO terms per example, the diffusion loss averaged over n_samples times (vlb); with loss="simple",
        ELBOTerms.objective is the training surrogate."""
        return self.vlb(x, n_samples)

    def elbo_for_evaluation(self, x: Tensor, n_samples: int = 1) -> ELBOTerms:
        """What the evaluator reports: the exact sum over steps in discrete time, Monte Carlo over t otherwise."""
        return self.vlb(x, n_samples, all_steps=self.config.timesteps > 0)

    def elbo_protocol(self, n_samples: int) -> str:
        if self.config.timesteps > 0:
            return (
                f"discrete time, T = {self.config.timesteps}: diffusion term summed exactly over all steps (one "
                "noise draw each)"
            )
        return (
            f"continuous time: diffusion term estimated with {n_samples} time sample(s) per example (stratified), "
            "one noise draw each"
        )

    def activation_elements(self) -> int:
        """Per-image activation elements of the denoiser's forward pass (bounds evaluation batches)."""
        return self.denoiser.activation_elements

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, on_step: Callable[[int, int], None] | None = None) -> Tensor:
        """Ancestral sampling with `steps` steps (default: the model's T, or 256 in continuous time), from
        z_1 ~ N(0, I) through p(z_s|z_t) (eq. (9); VDM App. A.4):
            z_s = alpha_s/alpha_t (z_t - sigma_t c eps_hat) + sigma_s sqrt(c) eps,  c = -expm1(gamma_s - gamma_t),
        then x ~ p(x|z_0). Returns images in [0, 1] (k/255). on_step(done, steps) is called after each step (a
        progress bar: elbox.core.progress.step_bar); it draws no random numbers."""
        steps = (self.config.timesteps or 256) if steps is None else steps
        check_count(n)
        check_count(steps, "the number of steps")
        ref = self.grid
        z = torch.randn(n, *self.config.data_shape, device=ref.device)
        ndim = len(self.config.data_shape)
        for i in range(steps, 0, -1):
            t = torch.full((n,), i / steps, device=ref.device)
            gamma_t, gamma_s = self.schedule(t), self.schedule(t - 1 / steps)
            eps_hat = self.predict_eps(z, gamma_t)
            c = _per_example(-torch.expm1(gamma_s - gamma_t), ndim)
            alpha_t, sigma_t = alpha_sigma(_per_example(gamma_t, ndim))
            alpha_s, sigma_s = alpha_sigma(_per_example(gamma_s, ndim))
            z = alpha_s / alpha_t * (z - sigma_t * c * eps_hat) + sigma_s * c.sqrt() * torch.randn_like(z)
            if on_step is not None:
                on_step(steps - i + 1, steps)
        gamma_0, _ = self.schedule.endpoints()
        u = z / alpha_sigma(gamma_0)[0]
        k = torch.cat(
            [
                torch.distributions.Categorical(logits=self.decoder_logits(u[i : i + 1], gamma_0)).sample()
                for i in range(n)
            ]
        )
        return k.float() / (NUM_LEVELS - 1)
