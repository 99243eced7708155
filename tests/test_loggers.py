"""--logger tensorboard writes event files that TensorBoard reads: scalars, bits/dim, image grids, histograms."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from elbox.cli.main import main


@pytest.mark.parametrize(
    "model",
    [
        ["--model", "vae", "--latent-dim", "2", "--hidden-dims", "16"],
        ["--model", "hvae", "--hvae-type", "markov", "--levels", "2", "--hidden-dims", "16"],
    ],
)
def test_tensorboard_logger_writes_scalars_images_and_histograms(tmp_path, model):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *model,
                "--data",
                "synthetic",
                "--epochs",
                "2",
                "--limit-train",
                "200",
                "--batch-size",
                "4",
                "--logger",
                "tensorboard",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    events = EventAccumulator(
        str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "histograms": 0}
    ).Reload()
    tags = events.Tags()
    for tag in (
        "train/elbo",
        "train/reconstruction",
        "train/kl",
        "train/bpd",
        "train/lr",
        "train/grad_norm",
        "train/images_per_s",
        "val/elbo",
        "val/bpd",
        "val/kl",
    ):
        assert tag in tags["scalars"], tag
    if model[1] == "hvae":
        assert "train/kl/z1" in tags["scalars"] and "val/kl/z2" in tags["scalars"]
    assert {"samples", "reconstructions"} <= set(tags["images"]) and "posterior_means" in tags["histograms"]
    val = [e.value for e in events.Scalars("val/elbo")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert val == pytest.approx([r["val_elbo"] for r in records if r["kind"] == "epoch"], rel=1e-6)
    assert len(events.Images("samples")) == 2


def test_logger_none_writes_no_metrics_file(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "synthetic",
                "--epochs",
                "1",
                "--limit-train",
                "100",
                "--latent-dim",
                "2",
                "--hidden-dims",
                "16",
                "--logger",
                "none",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert not (run / "metrics.jsonl").exists() and (run / "state.safetensors").exists()
