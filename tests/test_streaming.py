"""Training on data streamed from a Dataset (read on demand by DataLoader workers) follows the same batches and
randomness as the same images held in memory, validates chunk by chunk, and resumes bit for bit."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.data import Dataset

from elbox.data import get_data_space, load_split
from elbox.io.checkpoint import STATE_FILE, load_training_state
from elbox.io.run_config import TrainConfig
from elbox.models import build_model
from elbox.training.batches import read_ahead, share
from elbox.training.trainer import Trainer


class OnDemand(Dataset):
    """Images handed out one at a time, as a reader of files would."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].clone()


def train(train_data, val_data, run_dir=None, epochs=2, likelihood="bernoulli", workers=0):
    torch.manual_seed(0)
    model = build_model("vae", {"latent_dim": 3, "hidden_dims": [32], "likelihood": likelihood})
    config = TrainConfig(epochs=epochs, batch_size=64, eval_batch_size=50, log_every=1)
    trainer = Trainer(
        model, train_data, val_data, get_data_space(model.data_space), config, run_dir, progress=False, workers=workers
    )
    return trainer, trainer.fit()


def test_streamed_training_matches_training_in_memory():
    images, _ = load_split("synthetic", "train")
    val, _ = load_split("synthetic", "validation")
    in_memory, record = train(images[:300], val[:120])
    streamed, streamed_record = train(OnDemand(images[:300]), val[:120], workers=2)  # two reader processes
    for a, b in zip(in_memory.model.state_dict().values(), streamed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert record["val_elbo"] == streamed_record["val_elbo"]


def test_streamed_validation_matches_validation_in_memory():
    """8-bit data (no data randomness): chunk by chunk, the same ELBO as the whole set at once (the chunks are the
    evaluation batches, so the posterior draws are the same too)."""
    images, _ = load_split("synthetic", "train")
    val, _ = load_split("synthetic", "validation")
    _, record = train(images[:200], val[:120], epochs=1, likelihood="categorical")
    _, streamed = train(images[:200], OnDemand(val[:120]), epochs=1, likelihood="categorical")
    for key in ("val_elbo", "val_reconstruction", "val_kl"):
        torch.testing.assert_close(streamed[key], record[key], rtol=1e-9, atol=1e-6)


def test_streamed_run_resumes_bit_for_bit(tmp_path):
    images, _ = load_split("synthetic", "train")
    val, _ = load_split("synthetic", "validation")
    straight, _ = train(OnDemand(images[:300]), OnDemand(val[:100]), tmp_path / "a", epochs=2)
    train(OnDemand(images[:300]), OnDemand(val[:100]), tmp_path / "b", epochs=1)
    torch.manual_seed(0)
    model = build_model("vae", {"latent_dim": 3, "hidden_dims": [32]})
    config = TrainConfig(epochs=2, batch_size=64, eval_batch_size=50, log_every=1)
    resumed = Trainer(
        model,
        OnDemand(images[:300]),
        OnDemand(val[:100]),
        get_data_space("binary"),
        config,
        tmp_path / "b",
        progress=False,
    )
    # the state of epoch 1 was written with epochs=1; continue it under the two-epoch settings
    tensors, state = load_training_state(tmp_path / "b" / STATE_FILE)
    state["train_config"]["epochs"] = 2
    state["lr_scheduler"] = None
    resumed.restore(tensors, state)
    resumed.fit()
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_shares_split_every_row_once():
    for rows in (1, 7, 64, 65):
        for world in (1, 2, 3, 8):
            parts = [share(rows, rank, world) for rank in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert [b - a for a, b in parts] == [len(t) for t in torch.tensor_split(torch.arange(rows), world)]


def test_read_ahead_keeps_order_raises_errors_and_stops_when_closed():
    assert list(read_ahead(iter(range(10)))) == list(range(10))

    def failing():
        yield 1
        raise ValueError("unreadable row 7")

    with pytest.raises(ValueError, match="row 7"):
        list(read_ahead(failing()))
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    reader = read_ahead(endless(), depth=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()
    assert not any(t.name == "elbox-read-ahead" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # read at most `depth` (and the one in hand) ahead
