"""The Python API meets bad tensors with the clear messages of the command line, never a raw PyTorch error; grey
values reach a Bernoulli model only through its binarizations; sample() and encode() hand back results that carry
no autograd graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import elbox
from elbox.evaluation.evaluator import evaluate as evaluate_on
from elbox.evaluation.inference import BINARIZATIONS, score_with_stderr
from elbox.models import build_model

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def vae():
    """An untrained binary (Bernoulli) VAE: the inputs' handling does not need a trained one."""
    torch.manual_seed(0)
    return build_model("vae", {"data_shape": list(SHAPE), "latent_dim": 2, "hidden_dims": [16]}).eval()


def grey_images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def refused(call, *fragments: str) -> str:
    with pytest.raises(elbox.ElboxError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def test_sample_and_encode_return_results_without_gradients(vae):
    assert any(p.requires_grad for p in vae.parameters())
    images = elbox.sample(vae, 4)
    assert images.shape == (4, *SHAPE) and not images.requires_grad and images.grad_fn is None
    x = torch.from_numpy(grey_images()).float().div(255).requires_grad_()  # a tensor that requires grad is read as data
    features, names = elbox.encode(vae, x)
    assert isinstance(features["mean"], np.ndarray) and features["mean"].shape == (3, 2) and names == ["0", "1", "2"]
    values, _, _ = elbox.score(vae, x, iw_samples=2)
    assert not values.requires_grad


def test_bad_tensors_get_the_command_lines_messages(vae):
    x = grey_images()
    refused(
        lambda: elbox.encode(vae, torch.rand(3, *SHAPE, dtype=torch.float64)), "input array", "off the 8-bit grid k/255"
    )
    refused(lambda: elbox.encode(vae, x.astype(np.float32)), "input array", "floats must lie in [0, 1]")
    refused(
        lambda: elbox.score(vae, np.zeros((3, 1, 32, 32), np.uint8)),
        "input array has images of shape (1, 32, 32)",
        "the model takes (1, 28, 28)",
    )
    refused(lambda: elbox.score(vae, np.array(["a", "b"])), "input array has dtype <U1")
    refused(lambda: elbox.score(vae, torch.full((2, *SHAPE), float("nan"))), "input array", "NaN")
    refused(lambda: elbox.score(vae, np.zeros((0, *SHAPE), np.uint8)), "input array is empty")
    refused(lambda: elbox.score(vae, x, iw_samples=0), "iw_samples must be a whole number between 1 and 100000, got 0")
    refused(lambda: elbox.score(vae, x, batch_size=0), "batch_size must be a whole number between 1 and 10000, got 0")
    refused(
        lambda: elbox.score(vae, x, seed="a"), "seed must be a whole number between 0 and 9223372036854775807, got 'a'"
    )
    refused(
        lambda: elbox.encode(vae, x, binarizations=0), "binarizations must be a whole number between 1 and 10000, got 0"
    )
    refused(lambda: elbox.sample(vae, 2.5), "n must be a whole number between 1 and 10000, got 2.5")
    refused(
        lambda: elbox.sample(vae, 2, seed=-1), "seed must be a whole number between 0 and 9223372036854775807, got -1"
    )
    refused(lambda: elbox.sample("runs/vae", 2), "run directory runs/vae does not exist")  # a path is a run directory
    refused(lambda: elbox.sample(3, 2), "give a model, a Run or a run directory", "got int")
    refused(lambda: elbox.score(vae, x[:, :, :, :5]), "input array has images of shape (1, 28, 5)")


def test_one_image_without_its_batch_dimension_is_one_image(vae):
    x = grey_images(1)
    expected = elbox.score(vae, x, iw_samples=2)[0].tolist()
    assert elbox.score(vae, x[0], iw_samples=2)[0].tolist() == expected  # [1, 28, 28]
    assert elbox.score(vae, x[0, 0], iw_samples=2)[0].tolist() == expected  # [28, 28]
    assert elbox.score(vae, torch.from_numpy(x[0, 0]), iw_samples=2)[0].tolist() == expected


def test_grey_values_reach_a_bernoulli_model_only_through_binarizations(vae):
    x = grey_images()
    _, stderr, _, estimate = score_with_stderr(vae, x, iw_samples=2)
    assert (stderr > 0).all() and f"mean over {BINARIZATIONS} binarizations" in estimate
    features, _ = elbox.encode(vae, x)  # the mixture of the binarizations' posteriors
    single, _ = elbox.encode(vae, x, binarizations=1)
    assert features["variance"].shape == (3, 2) and not np.allclose(features["mean"], single["mean"])
    # data already in the model's space, to the evaluator: grey values are refused, never scored silently
    refused(
        lambda: evaluate_on(vae, torch.from_numpy(x).float() / 255, iw_samples=2),
        "data has values other than 0 and 1",
        "Bernoulli",
        "elbox.evaluate",
    )
    binary = (torch.from_numpy(x) > 127).double()  # float64 binary data are fine (computed in float32)
    assert evaluate_on(vae, binary, iw_samples=2)["n_examples"] == 3


def test_the_evaluator_names_a_wrong_tensor(vae):
    x = (torch.from_numpy(grey_images()) > 127).float()
    refused(
        lambda: evaluate_on(vae, x.to(torch.uint8), iw_samples=2),
        "data has dtype torch.uint8",
        "float tensor [N, 1, 28, 28] in the model's binary data space",
        "give 8-bit images (uint8) to elbox.evaluate",
    )
    refused(
        lambda: evaluate_on(vae, x.reshape(3, 784), iw_samples=2),
        "data has shape (3, 784)",
        "the model takes a float tensor [N, 1, 28, 28]",
    )
    refused(lambda: evaluate_on(vae, x.numpy(), iw_samples=2), "data is a ndarray")
    refused(lambda: evaluate_on(vae, x * float("nan"), iw_samples=2), "data contains NaN or infinite values")
    refused(lambda: elbox.evaluate(vae, torch.rand(3, *SHAPE, dtype=torch.float64), iw_samples=2), "off the 8-bit grid")
    continuous = build_model(
        "vae", {"data_shape": list(SHAPE), "latent_dim": 2, "hidden_dims": [8], "likelihood": "gaussian"}
    )
    refused(
        lambda: evaluate_on(continuous.eval(), x * 2, iw_samples=2),
        "data has values in [0, 2]",
        "continuous data space lies in [0, 1]",
    )
