"""The public Python API and the command line generated from the config dataclasses: the README's snippet, a VAE with
user-written networks, one default per option (command line == dataclasses), and `elbox train --config` replaying a
run bit for bit."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import elbox
from elbox.cli.main import main, train_parser
from elbox.core.errors import ElboxError
from elbox.core.options import option_specs
from elbox.io.run_config import DataConfig, TrainConfig, train_defaults
from elbox.models import MODELS, VAE, HVAEConfig, VAEConfig
from elbox.models.hvae_config import HVAE_TYPES, MarkovHVAEConfig

README = Path(__file__).resolve().parents[1] / "README.md"


class ConvEncoder(nn.Module):
    """A user-written encoder: x [B, 1, 8, 8] -> [B, 2 * latent] (means, then pre-softplus standard deviations)."""

    def __init__(self, latent: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2 * latent)
        )

    def forward(self, x):
        return self.net(x)


class ConvDecoder(nn.Module):
    """A user-written decoder: z [B, latent] -> Bernoulli logits [B, 1, 8, 8]."""

    def __init__(self, latent: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent, 8 * 4 * 4),
            nn.ReLU(),
            nn.Unflatten(1, (8, 4, 4)),
            nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1),
        )

    def forward(self, z):
        return self.net(z)


def blobs(n: int, seed: int = 0) -> torch.Tensor:
    """8-bit 8x8 images: a bright square at a random place on a dark background."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    corners = torch.randint(0, 5, (n, 2), generator=g)
    for i, (r, c) in enumerate(corners.tolist()):
        images[i, 0, r : r + 4, c : c + 4] = 230
    return images


def test_vae_with_user_written_networks_trains_evaluates_and_reloads(tmp_path):
    config = VAEConfig(data_shape=(1, 8, 8), latent_dim=2)
    model = VAE(config, encoder=ConvEncoder(2), decoder=ConvDecoder(2))
    run = elbox.fit(
        model,
        blobs(400),
        validation=blobs(100, seed=1),
        epochs=15,
        lr=3e-3,
        out=tmp_path / "run",
        progress=False,
        verbose=False,
    )
    first, last = run.history[0], [r for r in run.history if r.get("kind") == "epoch"][-1]
    assert last["val_elbo"] > first.get("val_elbo", -1e9)  # it learned
    result = elbox.evaluate(run, blobs(200, seed=2), iw_samples=[1, 50])
    # IWAE-50 is at least as tight as the ELBO (the paired gap's standard error from the result itself)
    assert result["gap_elbo_iw"] > -3 * result["gap_elbo_iw_stderr"] and result["latent_dim"] == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model_config"]
    assert saved["encoder"].endswith("test_api:ConvEncoder") and saved["decoder"].endswith("test_api:ConvDecoder")
    with pytest.raises(ElboxError, match="ConvEncoder"):
        elbox.load(tmp_path / "run")  # the user's networks are named, never unpickled: they must be passed in
    loaded = elbox.load(tmp_path / "run", encoder=ConvEncoder(2), decoder=ConvDecoder(2))
    x = blobs(8, seed=3).float() / 255
    torch.testing.assert_close(loaded.encode(x), run.model.eval().encode(x))
    with pytest.raises(ElboxError, match="ConvDecoder"):
        elbox.load(tmp_path / "run", encoder=ConvEncoder(2), decoder=ConvEncoder(2))


VARIANTS = [(name, {}) for name in sorted(MODELS) if name != "hvae"] + [("hvae", {"hvae_type": t}) for t in HVAE_TYPES]


@pytest.mark.parametrize("name, variant", VARIANTS)
def test_command_line_agrees_with_the_config_dataclasses(name, variant):
    """Every option has one default: the parser of `elbox train NAME` (for the HVAE, of each type) has exactly the
    declared fields of the model config (plus the training and data options), with the declared defaults and
    choices."""
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in variant.items()]
    parser, _, _ = train_parser(name, {}, argv)
    model_config_class = MODELS[name].config_class_for(variant)
    actions = {a.dest: a for a in parser._actions}
    expected_train = {**{s.name: s.default for s in option_specs(TrainConfig)}, **train_defaults(name, variant)}
    for config_class, defaults in ((TrainConfig, expected_train), (DataConfig, {}), (model_config_class, {})):
        for spec in option_specs(config_class):
            if not spec.cli:
                assert spec.name not in actions or spec.name not in {s.name for s in option_specs(model_config_class)}
                continue
            action = actions[spec.name]
            assert spec.flag in action.option_strings
            assert action.default == defaults.get(spec.name, spec.default), (name, spec.name)
            if spec.choices:
                assert action.metavar == "{" + ",".join(spec.choices) + "}"
    declared = {s.name for c in (TrainConfig, DataConfig, model_config_class) for s in option_specs(c) if s.cli}
    generated = {a.dest for a in parser._actions if a.option_strings} - {
        "help",
        "model_flag",
        "config",
        "out",
        "resume",
        "device",
        "no_progress",
        "threads",
    }
    assert generated == declared
    # options that only other models have are not offered
    own = {s.flag for c in (TrainConfig, DataConfig, model_config_class) for s in option_specs(c) if s.cli}
    others = {s.flag for m in MODELS.values() for c in m.config_classes() for s in option_specs(c)} - own
    assert others and not others & set(parser._option_string_actions)


def test_every_default_config_is_valid():
    for cls in MODELS.values():
        for config_class in cls.config_classes():
            config_class()
    assert MarkovHVAEConfig().latent_dims == [32, 16]  # the measured default: 2 levels
    assert MarkovHVAEConfig(levels=3).latent_dims == [32, 16, 8]
    with pytest.raises(ElboxError, match="MarkovHVAEConfig"):
        HVAEConfig()  # the types' base configures no model


def test_bad_option_values_name_the_option(capsys):
    assert main(["train", "vae", "--latent-dim", "0", "--out", "x"]) == 2
    assert "--latent-dim" in capsys.readouterr().err
    assert main(["train", "vea", "--out", "x"]) == 1
    assert "unknown model 'vea'" in capsys.readouterr().err
    with pytest.raises(ElboxError, match="unknown option"):
        elbox.fit("vae", blobs(20), latnet_dim=3)


def test_train_config_replays_a_run_bit_for_bit(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    options = [
        "--data",
        "synthetic",
        "--epochs",
        "2",
        "--limit-train",
        "256",
        "--latent-dim",
        "5",
        "--hidden-dims",
        "64",
        "32",
        "--lr",
        "2e-3",
        "--seed",
        "7",
        "--beta-schedule",
        "linear",
        "--warmup-epochs",
        "1",
        "--no-progress",
    ]
    assert main(["train", "vae", *options, "--out", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.json"), "--out", str(second), "--no-progress"]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # a single option given beside --config overrides it
    third = tmp_path / "c"
    assert (
        main(["train", "--config", str(first / "config.json"), "--epochs", "1", "--out", str(third), "--no-progress"])
        == 0
    )
    config = json.loads((third / "config.json").read_text())
    assert config["train"]["epochs"] == 1 and config["model_config"]["latent_dim"] == 5


def test_fit_from_python_with_arrays_and_closed_form_models():
    x = blobs(300).numpy()
    records = []
    run = elbox.fit("gaussian", x, covariance="diag", progress=False, verbose=False, callback=records.append)
    assert run.history == records and records[-1]["kind"] == "epoch"
    result = elbox.evaluate(run.model, blobs(50, seed=4))
    assert result["bpd_source"] == "exact" and result["n_examples"] == 50
    assert dataclasses.asdict(run.model.config)["covariance"] == "diag"
    with pytest.raises(ElboxError, match="shape"):
        elbox.evaluate(run.model, torch.zeros(3, 1, 5, 5, dtype=torch.uint8))


def test_train_help_lists_models(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert re.search(r"elbox train MODEL\s+--help", out) and "--latent-dim" not in out
    with pytest.raises(SystemExit):
        main(["train", "diffusion", "--help"])
    out = capsys.readouterr().out
    assert "--timesteps" in out and "--latent-dim" not in out
    assert isinstance(train_parser("vae", {})[0], argparse.ArgumentParser)


def test_runs_of_format_version_1_still_load(tmp_path):
    """A run directory written by elbox before this redesign (likelihood options as a dict in config.json) loads, and
    its ELBO on fixed inputs is the one the old code computed (tests/data/run-format-1/expected.json)."""
    from elbox.data import get_data_space, load_split

    fixture = Path(__file__).parent / "data" / "run-format-1"
    model = elbox.load(fixture)
    assert model.config.likelihood == "gaussian" and model.config.sigma == 0.2
    images, _ = load_split("synthetic", "test")
    x = get_data_space("continuous").eval_data(images[:16], seed=0)
    torch.manual_seed(0)
    expected = json.loads((fixture / "expected.json").read_text())["elbo_of_synthetic_test_16_seed_0"]
    torch.testing.assert_close(model.elbo(x).elbo.detach(), torch.tensor(expected), rtol=1e-6, atol=1e-3)
    result = elbox.evaluate(fixture, iw_samples=[2], limit=20)
    assert result["n_examples"] == 20 and result["data_space"] == "continuous"


def test_a_model_class_of_your_own_gets_training_evaluation_scoring_and_reports(tmp_path):
    """A user's model class on the model interface: registered by name, it trains, evaluates (IWAE, gaps, active
    units), samples, scores, saves, loads and reports like the built-in ones."""
    from elbox.core.bounds import ELBOTerms, kl_diag_gaussians, standard_normal_log_prob
    from elbox.core.options import check_options, option
    from elbox.models import LatentVariableModel, register_model

    @dataclasses.dataclass
    class TinyConfig:
        data_shape: tuple[int, ...] = option((1, 28, 28), "shape of one image", minimum=1, cli=False)
        latent_dim: int = option(2, "latent dimensions", minimum=1)

        def __post_init__(self):
            check_options(self)

    class TinyVAE(LatentVariableModel):
        """Linear encoder and decoder, Bernoulli likelihood: q(z|x) = N(Ax + a, diag(softplus(Bx + b)^2))."""

        def __init__(self, config):
            super().__init__(config)
            d = int(torch.tensor(config.data_shape).prod())
            self.enc, self.dec = nn.Linear(d, 2 * config.latent_dim), nn.Linear(config.latent_dim, d)

        data_space = "binary"

        def posterior(self, x):
            mean, raw = self.enc(x.flatten(1)).chunk(2, -1)
            return mean, nn.functional.softplus(raw) + 1e-4

        def log_px(self, x, z):  # [S, B]
            logits = self.dec(z)
            return -nn.functional.binary_cross_entropy_with_logits(
                logits, x.flatten(1).expand_as(logits), reduction="none"
            ).sum(-1)

        def elbo(self, x, n_samples=1):
            mean, std = self.posterior(x)
            z = mean + std * torch.randn(n_samples, *mean.shape)
            return ELBOTerms(reconstruction=self.log_px(x, z).mean(0), kl={"z": kl_diag_gaussians(mean, std).sum(-1)})

        def log_weights(self, x, k):
            mean, std = self.posterior(x)
            eps = torch.randn(k, *mean.shape)
            z = mean + std * eps
            log_q = standard_normal_log_prob(eps) - std.log().sum(-1)
            return self.log_px(x, z) + standard_normal_log_prob(z) - log_q

        def encode(self, x):
            return self.posterior(x)[0]

        def sample(self, n):
            return torch.sigmoid(self.dec(torch.randn(n, self.config.latent_dim))).reshape(n, *self.config.data_shape)

    register_model("tiny-test-vae", TinyConfig)(TinyVAE)
    try:
        run = elbox.fit(
            "tiny-test-vae", "synthetic", epochs=3, lr=3e-3, out=tmp_path / "run", progress=False, verbose=False
        )
        result = elbox.evaluate(run, iw_samples=[1, 20], limit=100)
        assert {"nll_iw", "gap_elbo_iw", "active_units"} <= set(result) and result["latent_dim"] == 2
        assert result["gap_elbo_iw"] > -3 * result["gap_elbo_iw_stderr"]
        loaded = elbox.load(tmp_path / "run")
        assert isinstance(loaded, TinyVAE) and elbox.sample(loaded, 4).shape == (4, 1, 28, 28)
        images = (torch.rand(5, 1, 28, 28) > 0.5).to(torch.uint8) * 255
        scores, names, estimate = elbox.score(loaded, images, iw_samples=10)
        assert scores.shape == (5,) and torch.isfinite(scores).all() and "IWAE" in estimate
        assert main(["report", str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "report.html").is_file()
    finally:
        MODELS.pop("tiny-test-vae")


def test_no_submodule_shadows_a_public_function():
    """Importing elbox.X sets the attribute elbox.X to the module: a submodule named like a public function (e.g. a
    module elbox/score.py beside elbox.score) would replace the function once anything imports it."""
    import pkgutil

    import elbox.cli  # noqa: F401  (imports every command's module)

    modules = {m.name for m in pkgutil.iter_modules(elbox.__path__)}
    assert not set(elbox.__all__) & modules
    assert all(
        callable(getattr(elbox, name)) for name in ("fit", "resume", "evaluate", "load", "sample", "score", "encode")
    )
