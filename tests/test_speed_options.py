"""Speed options: --compile, --channels-last, --precision bf16 on hardware without bf16, --threads, and the
automatic memory bound and progress of evaluation. Each option must leave the numbers unchanged (to float
rounding) and the run files loadable."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import make_trainer

from elbox.cli.main import main
from elbox.core.system import bf16_is_native, set_threads
from elbox.data import get_data_space, load_split
from elbox.io.checkpoint import STATE_FILE, load_training_state
from elbox.models import build_model
from elbox.models import estimates as evaluate_module
from elbox.models.estimates import elbo_per_example, examples_progress, iwae_per_example, memory_bound
from elbox.training.trainer import Trainer

VAE = ("vae", {"latent_dim": 4, "hidden_dims": [64]})
DIFFUSION = ("diffusion", {"channels": [8, 16]})


def trainer_for(tmp_path, name, config, **options) -> Trainer:
    """One epoch of two steps of 32 images."""
    return make_trainer(tmp_path, name, config, n_train=64, n_val=32, epochs=1, batch_size=32, **options)


def loss_and_grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    """The training objective and its gradients on a fixed batch with fixed model noise."""
    train, _ = load_split("synthetic", "train")
    x = trainer.space.train_batch(train[:32], torch.Generator().manual_seed(0))  # contiguous: the objective converts
    torch.manual_seed(1)
    objective, _ = trainer.objective(x, 1.0)
    objective.backward()
    return objective.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_same_step(reference, other):
    assert other[0] == pytest.approx(reference[0], rel=1e-5)
    assert other[1].keys() == reference[1].keys()
    for name, g in reference[1].items():
        torch.testing.assert_close(other[1][name], g, rtol=1e-3, atol=1e-5 * g.abs().max().item() + 1e-7, msg=name)


def test_compile_gives_the_eager_objective_and_gradients(tmp_path):
    eager = loss_and_grads(trainer_for(tmp_path / "eager", *VAE))
    compiled_trainer = trainer_for(tmp_path / "compiled", *VAE, compile=True)
    assert isinstance(compiled_trainer.objective, torch._dynamo.eval_frame.OptimizedModule)
    # inductor's own random numbers differ from eager's; draw them with the eager generator to compare the math
    with torch._inductor.config.patch(fallback_random=True):
        assert_same_step(eager, loss_and_grads(compiled_trainer))


@pytest.mark.parametrize("name", ["vae", "hvae"])
def test_compiled_importance_sampling_gives_the_eager_bounds(name):
    """evaluate --compile: the same IWAE-K per example as eager, with the eager generator's draws (inductor draws
    its own otherwise), over batches of two sizes (2, 2, 1 examples) and passes of several sizes (3, 3, 1 samples;
    6, 1)."""
    config = {"latent_dim": 4, "hidden_dims": [32], "prior": "vamp", "pseudo_inputs": 5}
    if name == "hvae":
        config = {"hvae_type": "skip", "latent_dims": [3, 2], "hidden_dims": [16], "top_prior": "vamp"}
        config["pseudo_inputs"] = 5
    model = build_model(name, {"data_shape": [1, 8, 8], **config}).eval()
    x = (torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    torch.manual_seed(1)
    eager = iwae_per_example(model, x, 7, 2, max_decoder_elements=3 * 2 * 64)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(1)
        compiled = evaluate_module.iwae_by_k_per_example(model, x, [7], 2, 3 * 2 * 64, compile=True)[7]
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-4)


def test_channels_last_gives_the_same_step_and_resumable_checkpoints(tmp_path):
    contiguous = loss_and_grads(trainer_for(tmp_path / "a", *DIFFUSION))
    trainer = trainer_for(tmp_path / "b", *DIFFUSION, channels_last=True)
    conv = trainer.model.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_same_step(contiguous, loss_and_grads(trainer))
    trainer.optimizer.zero_grad()
    record = trainer.fit()
    assert math.isfinite(record["val_elbo"])
    # the saved state (written contiguous) loads back into a channels-last trainer, Adam moments included
    resumed = trainer_for(tmp_path / "b", *DIFFUSION, channels_last=True)
    resumed.restore(*load_training_state(tmp_path / "b" / STATE_FILE))
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert resumed.training_step(trainer.val_x[:16], 1.0) not in ("nonfinite", "large_grad")


def test_cli_compile_and_channels_last_runs_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "vae",
                "--data",
                "synthetic",
                "--epochs",
                "1",
                "--hidden-dims",
                "32",
                "--latent-dim",
                "4",
                "--compile",
                "--out",
                str(out),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["compile"] is True
    assert main(["evaluate", str(out), "--iw-samples", "10", "--no-progress"]) == 0
    assert "NLL (IWAE, K=10)" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--iw-samples", "10", "--compile", "--no-progress"]) == 0
    assert "NLL (IWAE, K=10)" in capsys.readouterr().out
    # the option is recorded in the run config, which --resume takes its settings from
    out = tmp_path / "diffusion"
    assert (
        main(
            [
                "train",
                "--model",
                "diffusion",
                "--data",
                "synthetic",
                "--epochs",
                "1",
                "--unet-channels",
                "8",
                "--channels-last",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["train"]["channels_last"] is True


def test_bf16_warns_where_the_hardware_emulates_it(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, *VAE, precision="bf16")
    emulated = [w for w in caught if "no native bfloat16" in str(w.message)]
    assert len(emulated) == (0 if bf16_is_native(torch.device("cpu")) else 1)


def test_thread_settings(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")  # more processes than cores: at least one thread each
        assert set_threads(None) == 1
    finally:
        torch.set_num_threads(before)


def test_memory_bound_follows_available_memory(monkeypatch):
    cpu = torch.device("cpu")
    assert memory_bound(cpu) <= evaluate_module.CPU_MAX_DECODER_ELEMENTS
    if evaluate_module.available_memory_bytes(cpu) > 2**32:  # convolutional nets: a training batch of images per pass
        assert memory_bound(cpu, 150_000) == evaluate_module.CPU_MIN_PASS_IMAGES * 150_000
    monkeypatch.setattr(evaluate_module, "available_memory_bytes", lambda device: 64 * 2**20)
    assert memory_bound(cpu) == 64 * 2**20 // (4 * evaluate_module.LIVE_TEMPORARIES)  # 1/16 of 64 MiB in float32
    monkeypatch.setattr(evaluate_module, "available_memory_bytes", lambda device: 0)
    assert memory_bound(cpu) == 2**16  # the floor: tiny passes rather than none


def test_evaluation_passes_respect_the_memory_bound(monkeypatch):
    """Examples x samples per pass stay under the bound, for the ELBO (diffusion) and IWAE (VAE)."""
    model = build_model(*DIFFUSION).eval()
    x = get_data_space(model.data_space).eval_data(load_split("synthetic", "validation")[0][:40], seed=0)
    seen = []
    original = model.elbo
    monkeypatch.setattr(
        model, "elbo", lambda xb, n_samples: seen.append(xb.shape[0] * n_samples) or original(xb, n_samples)
    )
    per_sample = model.activation_elements()
    elbo_per_example(model, x, batch_size=500, n_samples=4, max_decoder_elements=10 * per_sample, final=False)
    assert sum(seen) == 160 and max(seen) <= 10 and len(seen) == 20  # 2 examples x 4 samples per pass

    vae = build_model(*VAE).eval()
    xv = get_data_space(vae.data_space).eval_data(load_split("synthetic", "validation")[0][:20], seed=0)
    chunks = []
    original_bounds = evaluate_module.iwae_bounds
    monkeypatch.setattr(
        evaluate_module, "iwae_bounds", lambda draw, ks, chunk: chunks.append(chunk) or original_bounds(draw, ks, chunk)
    )
    d = vae.likelihood.num_params * 784  # decoder outputs per sample of a 28x28 synthetic image
    values = iwae_per_example(vae, xv, 100, batch_size=10, max_decoder_elements=3 * 10 * d)
    assert chunks == [3, 3] and torch.isfinite(values).all()  # 3 samples of 10 examples per pass


def test_progress_counts_examples():
    assert list(examples_progress(1050, 500, "x", progress=False)) == [0, 500, 1000]


def test_train_defaults_depend_on_the_model():
    """The VAE's defaults are the measured time-to-quality ones, the HVAE's the measured likelihood recipe; other
    models keep the general defaults; options given on the command line win."""
    from elbox.cli.main import train_parser

    def filled(model, *argv):
        parser, _, _ = train_parser(model, {}, argv)
        args = parser.parse_args(["--out", "x", *argv])
        return args.epochs, args.lr, args.lr_schedule, getattr(args, "latent_dim", None)

    assert filled("vae") == (36, 3e-3, "cosine", 32)
    assert filled("hvae") == (115, 1e-3, "cosine", None)  # the default type, skip
    assert filled("hvae", "--hvae-type", "mlp-ladder") == (75, 2e-3, "cosine", None)
    assert filled("hvae", "--hvae-type", "ladder") == (10, 1e-3, "constant", None)  # no measured recipe
    assert filled("hvae", "--hvae-type", "conv-skip") == (10, 1e-3, "constant", None)
    assert filled("diffusion") == (10, 1e-3, "constant", None)
    assert filled("linear") == (10, 1e-3, "constant", 20)
    assert filled("vae", "--epochs", "5", "--lr", "1e-4", "--lr-schedule", "constant") == (5, 1e-4, "constant", 32)
