"""Where training curves go besides the checkpointed records: metrics.jsonl (default), TensorBoard, or nowhere.

TensorBoard (`--logger tensorboard`, event files in RUN_DIR/tensorboard; view with `tensorboard --logdir RUN_DIR`):
  train/<name>   every logged training record: elbo, reconstruction, kl, kl/<group>, objective, grad_norm,
                 lr, beta, images_per_s, and bpd (= -elbo / (D ln 2)), against the optimizer step
  val/<name>     each epoch's validation ELBO terms and val/bpd, against the step at the epoch's end
  samples, reconstructions   image grids of the evaluation weights each epoch
  posterior_means            a histogram of the validation posterior means (models with an encoder)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from elbox.core.extras import require
from elbox.models.base import Encoder, Reconstructs

LOGGERS = ("jsonl", "tensorboard", "none")
TENSORBOARD_DIR = "tensorboard"
SKIPPED_KEYS = ("kind", "epoch", "step")


class TensorBoardLog:
    """Writes elbox records and image grids as TensorBoard events."""

    def __init__(self, run_dir: str | Path, num_dims: int):
        require("tensorboard", "--logger tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        self.bits = num_dims * math.log(2)

    def record(self, record: dict) -> None:
        """A "train" record (per logged step) or an "epoch" record (train_* averages and val_* values)."""
        step = record["step"]
        for key, value in record.items():
            if key in SKIPPED_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if record["kind"] == "train":
                self.writer.add_scalar(f"train/{key}", value, step)
            elif key.startswith("val_"):
                self.writer.add_scalar(f"val/{key[4:]}", value, step)
            else:
                self.writer.add_scalar(f"epoch/{key}", value, step)
        elbo = record.get("elbo" if record["kind"] == "train" else "val_elbo")
        if elbo is not None:
            self.writer.add_scalar(f"{'train' if record['kind'] == 'train' else 'val'}/bpd", -elbo / self.bits, step)

    @torch.no_grad()
    def images(self, model, val_x: torch.Tensor, step: int, n: int = 16) -> None:
        """Samples, reconstructions of validation images, and a histogram of their posterior means."""
        from elbox.io.plots import image_grid

        def add(tag: str, images: torch.Tensor, nrow: int | None = None) -> None:
            grid = image_grid(images.clamp(0, 1).cpu(), nrow=nrow, scale=1)
            array = torch.frombuffer(bytearray(grid.tobytes()), dtype=torch.uint8)
            array = array.reshape(grid.height, grid.width, -1).permute(2, 0, 1)
            self.writer.add_image(tag, array, step)

        model.eval()
        with torch.random.fork_rng(
            devices=[val_x.device] if val_x.device.type == "cuda" else []
        ):  # training's stream stays as it was
            torch.manual_seed(step)
            add("samples", model.sample(n))
            if isinstance(model, Reconstructs):
                add("reconstructions", torch.cat([val_x[:8], model.reconstruct(val_x[:8])]), nrow=8)
            if isinstance(model, Encoder):
                self.writer.add_histogram("posterior_means", model.encode(val_x[:500]).flatten().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
