"""Network building blocks shared by the models."""

from __future__ import annotations

import math

from torch import Tensor, nn

from elbox.errors import ElboxError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ElboxError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    # in place where the module supports it: the activation's input is a fresh Linear/Conv output
    return ACTIVATIONS[name](inplace=True) if name in ("relu", "silu", "elu") else ACTIVATIONS[name]()


def mlp(in_dim: int, hidden_dims: list[int], out_dim: int, act: str = "relu") -> nn.Sequential:
    """in_dim -> hidden_dims... -> out_dim, with the activation between layers and none at the end."""
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden_dims]
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), activation(act)]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


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
    for c_in, c_out in zip(rev[:-1], rev[1:]):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
    layers.append(nn.ConvTranspose2d(rev[-1], out_channels, 4, stride=2, padding=1))
    return nn.Sequential(*layers), (rev[0], h // scale, w // scale)


def apply_flat(net: nn.Module, x: Tensor, n_event_dims: int) -> Tensor:
    """Run a net that takes [N, *event] on x of shape [*batch, *event], keeping the batch dims."""
    batch = x.shape[: x.dim() - n_event_dims]
    out = net(x.reshape(math.prod(batch), *x.shape[x.dim() - n_event_dims :]))
    return out.reshape(*batch, *out.shape[1:])
