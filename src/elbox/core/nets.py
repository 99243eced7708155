"""Network building blocks shared by the models."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.core.errors import ElboxError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def inverse_softplus(y: Tensor | float) -> Tensor | float:
    """s with softplus(s) = log(1 + e^s) = y, for y > 0 (a tensor or a float): log(expm1(y)), computed as
    y + log(-expm1(-y)), which neither overflows for large y nor loses digits for small y."""
    if isinstance(y, Tensor):
        return y + torch.log(-torch.expm1(-y))
    return y + math.log(-math.expm1(-y))


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ElboxError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    # in place where the module supports it: the activation's input is a fresh Linear/Conv output
    return ACTIVATIONS[name](inplace=True) if name in ("relu", "silu", "elu") else ACTIVATIONS[name]()


GATED = "gated"  # hidden layers h = (W x + b) * sigmoid(V x + c) instead of act(W x + b): GatedDense
MLP_ACTIVATIONS = (*ACTIVATIONS, GATED)  # what an MLP's hidden layers may be
WEIGHT_INITS = ("default", "he")


class GatedDense(nn.Module):
    """h = (W x + b) * sigmoid(V x + c): a dense layer with a learned sigmoid gate and no other nonlinearity
    (Dauphin et al. 2017's gated linear unit on dense layers, as in Tomczak & Welling 2018's VampPrior networks).
    W and V are the two halves of one Linear layer's weight, [W; V], so both come from one matrix product."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 2 * out_dim)  # He initialization and PyTorch's biases see the same fan_in

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.linear(x))

    @staticmethod
    def gate(pre: Tensor) -> Tensor:
        """The layer's output from its Linear's output [W x + b; V x + c]."""
        h, g = pre.chunk(2, dim=-1)
        return h * torch.sigmoid(g)


def hidden_layer(in_dim: int, out_dim: int, act: str) -> list[nn.Module]:
    """One hidden layer of an MLP: a GatedDense layer, or a Linear layer and its activation."""
    return [GatedDense(in_dim, out_dim)] if act == GATED else [nn.Linear(in_dim, out_dim), activation(act)]


def mlp(in_dim: int, hidden_dims: list[int], out_dim: int, act: str = "relu") -> nn.Sequential:
    """in_dim -> hidden_dims... -> out_dim, with the activation between layers (or gated hidden layers: act "gated")
    and none at the end."""
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden_dims]
    for d_in, d_out in itertools.pairwise(dims):
        layers += hidden_layer(d_in, d_out, act)
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


def split_first_layer(net: nn.Sequential) -> tuple[nn.Linear, Callable[[Tensor], Tensor], nn.Sequential]:
    """An `mlp` with hidden layers as its first Linear, the activation that follows it, and the rest of the network,
    so that net(x) = rest(activation(linear(x)))."""
    first = net[0]
    if isinstance(first, GatedDense):
        return first.linear, first.gate, net[1:]
    return first, net[1], net[2:]


def check_logvar_bounds(bounds: list[float] | None) -> None:
    if bounds is not None and (len(bounds) != 2 or not bounds[0] < bounds[1]):
        raise ElboxError(f"logvar_bounds takes two numbers LOW < HIGH, got {bounds}")


def posterior_std(raw: Tensor, bounds: list[float] | None, min_std: float) -> Tensor:
    """A Gaussian's standard deviation from a network's raw output: exp(hardtanh(raw, LOW, HIGH) / 2) with log-variance
    bounds (Tomczak & Welling 2018), else softplus(raw) + min_std."""
    if bounds is not None:
        return (0.5 * F.hardtanh(raw, bounds[0], bounds[1])).exp()
    return F.softplus(raw) + min_std


@torch.no_grad()
def initialize_weights(module: nn.Module, scheme: str) -> None:
    """ "he": every Linear layer's weight ~ N(0, 2 / fan_in) (He et al. 2015; biases keep PyTorch's default), as the
    VampPrior networks are initialized; "default": PyTorch's own initialization, unchanged."""
    if scheme == "he":
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, math.sqrt(2.0 / layer.in_features))


def conv_encoder(data_shape: tuple[int, int, int], channels: list[int], act: str) -> tuple[nn.Sequential, int]:
    """Stride-2 4x4 convolutions, each halving height and width. Returns (net, flattened feature size)."""
    c, h, w = data_shape
    scale = 2 ** len(channels)
    if h % scale or w % scale:
        raise ElboxError(f"the conv architecture needs height and width divisible by {scale}, got {h}x{w}")
    layers: list[nn.Module] = []
    for c_in, c_out in zip([c, *channels[:-1]], channels):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), channels[-1] * (h // scale) * (w // scale)


def conv_decoder(
    data_shape: tuple[int, int, int], channels: list[int], out_channels: int, act: str
) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """Mirror of conv_encoder: transposed convolutions doubling height and width.

    Returns (net, the input feature shape [C, H, W] it expects).
    """
    _, h, w = data_shape
    scale = 2 ** len(channels)
    rev = list(reversed(channels))
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(rev):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
    layers.append(nn.ConvTranspose2d(rev[-1], out_channels, 4, stride=2, padding=1))
    return nn.Sequential(*layers), (rev[0], h // scale, w // scale)


class ResidualMLP(nn.Module):
    """x + branch(x) on vectors, branch = act -> Linear(width, hidden) -> act -> Linear(hidden, width) (pre-activation
    residual block). The last layer's bias starts at zero and its weight scaled by residual_scale (VDVAE, Child
    2021)."""

    def __init__(self, width: int, hidden: int, act: str, residual_scale: float = 1.0):
        super().__init__()
        # the first activation must not work in place: its input is the skip path
        self.branch = nn.Sequential(
            ACTIVATIONS[act](), nn.Linear(width, hidden), activation(act), nn.Linear(hidden, width)
        )
        with torch.no_grad():
            self.branch[-1].weight.mul_(residual_scale)
            self.branch[-1].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


def apply_flat(net: nn.Module, x: Tensor, n_event_dims: int) -> Tensor:
    """Run a net that takes [N, *event] on x of shape [*batch, *event], keeping the batch dims."""
    batch = x.shape[: x.dim() - n_event_dims]
    out = net(x.reshape(math.prod(batch), *x.shape[x.dim() - n_event_dims :]))
    return out.reshape(*batch, *out.shape[1:])


# ----------------------------------------------------------------------------------------------
# A time-conditioned U-Net (the diffusion denoiser)


def sinusoidal_embedding(c: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Transformer-style embedding [N, dim] of scalars c [N] (scaled by `scale`, so c in [0, 1] spans many periods)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c.device, dtype=c.dtype) / half)
    angles = scale * c[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


FOURIER_EXPONENTS = (6, 7)


def fourier_features(z: Tensor, exponents: tuple[int, ...] = FOURIER_EXPONENTS) -> Tensor:
    """sin and cos of 2^n * 2 pi * z per channel (VDM), so the net resolves the fine 8-bit grid of z at low noise."""
    angles = torch.cat([z * (2.0**n * 2 * math.pi) for n in exponents], dim=1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """skip(x) + branch(x), with the branch optionally conditioned on an embedding [N, emb_dim], whose linear
    projection is added (per channel) to the branch's activations at one point. The one residual block of
    both model families; build it with one of its two layouts, whose submodule names are the state_dict keys
    of saved weights:

    ResBlock.bottleneck     VDVAE-style (Child 2021): GELU-conv 1x1, 3x3, 3x3, 1x1 (keys branch.1/3/5/7);
                            no skip when the widths differ (a plain head, e.g. a prior or posterior head)
    ResBlock.conditioned    DDPM-style (Ho et al. 2020): GroupNorm-SiLU-conv 3x3, + the embedding's projection,
                            GroupNorm-SiLU-conv 3x3 (keys norm1, conv1, emb, norm2, conv2); a 1x1 conv skip
                            when the widths differ
    """

    EMBED = "embed"  # marks, in `layers`, where the embedding's projection is added

    def __init__(self) -> None:
        super().__init__()
        self.layers: list = []  # the branch's layers in order (the modules are registered by the layouts)
        self.skip: nn.Module | None = None

    @classmethod
    def bottleneck(
        cls,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        residual_scale: float = 1.0,
        zero_last: bool = False,
    ) -> ResBlock:
        """out_channels != in_channels makes it a plain head (no skip). The last conv's bias starts at zero and
        its weight at zero (zero_last) or scaled by residual_scale."""
        block = cls()
        block.branch = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(in_channels, mid_channels, 1),
            nn.GELU(),
            nn.Conv2d(mid_channels, mid_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(mid_channels, mid_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(mid_channels, out_channels, 1),
        )
        last = block.branch[-1]
        with torch.no_grad():
            if zero_last:
                last.weight.zero_()
            else:
                last.weight.mul_(residual_scale)
            last.bias.zero_()
        block.skip = nn.Identity() if in_channels == out_channels else None
        block.layers = list(block.branch)
        return block

    @classmethod
    def conditioned(cls, c_in: int, c_out: int, emb_dim: int) -> ResBlock:
        """The second conv starts at zero, so the block starts as the identity (or its 1x1 skip)."""
        block = cls()
        block.norm1, block.conv1 = _group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        block.emb = nn.Linear(emb_dim, c_out)
        block.norm2, block.conv2 = _group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(block.conv2.bias)
        block.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        block.layers = [block.norm1, F.silu, block.conv1, cls.EMBED, block.norm2, F.silu, block.conv2]
        return block

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = x
        for layer in self.layers:
            h = (h + self.emb(emb)[:, :, None, None]) if layer is self.EMBED else layer(h)
        return h if self.skip is None else self.skip(x) + h


class ConditionedUNet(nn.Module):
    """U-Net without attention for small images, conditioned on one scalar per example (e.g. a normalized log-SNR).

    channels[i] is the width at resolution level i (level 0 = full size; each further level halves height and
    width); `blocks` residual blocks per level on the way down, blocks + 1 on the way up (each taking a skip).
    Optional Fourier features of the input (`fourier_features`). The output convolution starts at zero.
    """

    def __init__(self, data_shape: tuple[int, int, int], channels: list[int], blocks: int, fourier: bool):
        super().__init__()
        c, h, w = data_shape
        scale = 2 ** (len(channels) - 1)
        if h % scale or w % scale:
            raise ElboxError(
                f"a U-Net with {len(channels)} levels needs height and width divisible by {scale}, got {h}x{w}"
            )
        self.fourier = fourier
        emb_dim = 4 * channels[0]
        self.embed_dim = 2 * math.ceil(channels[0] / 2)  # sin and cos halves
        self.embed = nn.Sequential(nn.Linear(self.embed_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        in_channels = c * (1 + 2 * len(FOURIER_EXPONENTS) if fourier else 1)  # z plus sin and cos per frequency
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [channels[0]]
        skip_elements = channels[0] * h * w
        width = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(blocks):
                self.down.append(ResBlock.conditioned(width, ch, emb_dim))
                width = ch
                skips.append(width)
                skip_elements += width * (h >> level) * (w >> level)
            if level < len(channels) - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skips.append(width)
                skip_elements += width * (h >> (level + 1)) * (w >> (level + 1))
        # activation elements per image alive at once in a forward pass without gradients: the skips kept for the
        # way up, plus a concatenation and two block temporaries at full resolution (bounds evaluation batches)
        self.activation_elements = skip_elements + 3 * 2 * channels[0] * h * w
        self.mid = ResBlock.conditioned(width, width, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, ch in reversed(list(enumerate(channels))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock.conditioned(width + skips.pop(), ch, emb_dim))
                width = ch
            if level > 0:
                self.upsample.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1))
                )
        self.blocks = blocks
        self.levels = len(channels)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z: Tensor, cond: Tensor) -> Tensor:
        """z [N, C, H, W], cond [N] -> [N, C, H, W]."""
        emb = self.embed(sinusoidal_embedding(cond, self.embed_dim))
        h = self.conv_in(torch.cat([z, fourier_features(z)], dim=1) if self.fourier else z)
        hs = [h]
        blocks = iter(self.down)
        for level in range(self.levels):
            for _ in range(self.blocks):
                h = next(blocks)(h, emb)
                hs.append(h)
            if level < self.levels - 1:
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid(h, emb)
        blocks = iter(self.up)
        for i, level in enumerate(reversed(range(self.levels))):
            for _ in range(self.blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if level > 0:
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))
