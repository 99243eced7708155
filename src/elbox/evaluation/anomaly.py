"""Anomaly scores: how unusual each example is to a trained model (higher = more unusual), and its p-value against
reference data the user trusts.

A model's likelihood alone is a poor detector: models of Fashion-MNIST give digits a *higher* likelihood than
clothes (Nalisnick et al. 2019, "Do deep generative models know what they don't know?"), because log p(x) is
dominated by how simple an image is (few edges, much background), not by what it shows. The other scores correct
for that in different ways:

    likelihood   -log p(x), nats: the exact log p(x), IWAE-K or the ELBO, as `elbox score` computes it.
    complexity   -log2 p(x) - L(x), bits (Serrà et al. 2020, "Input complexity and out-of-distribution detection
                 with likelihood-based generative models"): L(x) is x's length under a general-purpose lossless code
                 (PNG through Pillow, compression level 9), so the score is what the model saves over a code that
                 knows nothing of the data. Images only; L is of the image the model reads: a binary model's
                 binarizations, in PNG's 1-bit mode (the 8-bit image's PNG instead scored digits a little better,
                 AUROC 0.888 against 0.835, but ranked uniform noise below clothes, 0.0 against 0.903: two code
                 lengths of different objects; benchmarks/ood.py, the default HVAE).
    typicality   |-log p(x) - H|, nats (Nalisnick et al. 2019, "Detecting out-of-distribution inputs to deep
                 generative models using typicality", with batches of one example): H = the mean of -log p over the
                 reference data, an estimate of the entropy of the data; an example far from it on either side is
                 atypical.
    llr          LLR^{>k} = L^{>0}(x) - L^{>k}(x), nats (Havtorn et al. 2021, "Hierarchical VAEs know what they don't
                 know"): L^{>k} is the importance-weighted bound whose k levels next to x come from their prior
                 p(z_<=k|z_>k) rather than from q; the low levels explain the pixels of any image, the high ones the
                 semantics, so an image the high levels do not fit loses much when the low levels cannot adapt.
                 Hierarchical VAEs (the hvae model); k = 0 gives 0.
    regret       the likelihood regret (Xiao et al. 2020, "Likelihood regret: an out-of-distribution detection score
                 for variational auto-encoder"): the ELBO gained by fitting q to x alone (decoder fixed) over the
                 amortized encoder's q. Models with an amortized Gaussian encoder (vae; what `elbox tighten` fits).
    background   log p_B(x) - log p(x), nats (Ren et al. 2019, "Likelihood ratios for out-of-distribution
                 detection"): p_B is a second model, of the same data shape, trained on perturbed data
                 (`elbox train ... --perturb RATE`), which learns the background statistics and not the semantics.

Each example's randomness (importance samples, binarizations, refits) is seeded by the example itself, as in
`elbox score`, so its score does not depend on the other examples scored with it.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from elbox.core.command_options import BINARIZATIONS, ScoreOptions
from elbox.core.errors import ElboxError
from elbox.core.limits import ANOMALY_METHODS, check_count_option
from elbox.core.options import did_you_mean, short_repr
from elbox.evaluation.inference import model_inputs
from elbox.models.base import ExactLikelihood, ImportanceWeighted, LatentVariableModel, LevelBounds, Tightenable
from elbox.models.estimates import (
    example_means,
    examples_progress,
    iwae_per_example,
    score_per_example,
    seeded_per_example,
)

METHODS = ANOMALY_METHODS
UNITS = {
    "likelihood": "nats",
    "complexity": "bits",
    "typicality": "nats",
    "llr": "nats",
    "regret": "nats",
    "background": "nats",
}
# rows x samples x elements of one pass of the regret's refit: about 64 grey images of 28 x 28 in 16 binarizations
REGRET_PASS_ELEMENTS = 2**23


@dataclass
class ScoreSettings:
    """How the scores are estimated: importance samples (of log p(x) and of both bounds of LLR), LLR's k, the
    per-example refit of the regret, examples per pass of a model without randomness, the seed, and how many
    binarizations a binary model averages over for a grey image."""

    iw_samples: int = 100
    llr_k: int = ScoreOptions.llr_k
    regret_steps: int = ScoreOptions.regret_steps
    batch_size: int = ScoreOptions.batch_size
    seed: int = ScoreOptions.seed
    binarizations: int = BINARIZATIONS
    elbo_samples: int = 1  # ELBO draws of log p(x) of a model without importance weights (diffusion), as elbox score

    def __post_init__(self):
        for name in ("iw_samples", "llr_k", "regret_steps", "batch_size", "seed", "binarizations", "elbo_samples"):
            check_count_option(getattr(self, name), name)


def why_not_applicable(
    model: LatentVariableModel, method: str, background: LatentVariableModel | None = None
) -> str | None:
    """None if the score applies to the model, else the reason, in words."""
    if method == "complexity" and model.data_space == "real":
        return "complexity corrects for an image's code length and needs a model of images; this one models vectors"
    if method == "llr" and not isinstance(model, LevelBounds):
        return (
            f"llr compares bounds with and without the lowest latent levels and needs a hierarchical VAE (the hvae "
            f"model); the {model.name} model has a single level"
        )
    if method == "regret" and not (isinstance(model, Tightenable) and model.amortization_gap):
        return (
            f"regret measures how far a per-example q(z|x) beats an amortized encoder's (the vae model); the "
            f"{model.name} model has no such gap (the linear model's best diagonal q is linear in x, which its encoder "
            "represents exactly)"
        )
    if method == "background" and background is None:
        return "background needs a second run trained on perturbed data (--background RUN)"
    return None


def applicable_methods(model: LatentVariableModel, background: LatentVariableModel | None = None) -> list[str]:
    return [m for m in METHODS if why_not_applicable(model, m, background) is None]


def method_list(methods: Any) -> list[str]:
    """The methods asked for as a list, each once, in the order given (one name alone may be a string)."""
    if isinstance(methods, str):
        return [methods]
    try:
        return list(dict.fromkeys(methods))
    except TypeError:
        raise ElboxError(f"methods must be a list of anomaly score names, got {short_repr(methods)}") from None


def check_methods(
    model: LatentVariableModel, methods: list[str], background: LatentVariableModel | None = None
) -> None:
    """ElboxError for an unknown method, one that does not apply, an LLR k beyond the model's levels, or a background
    model of other data."""
    if not methods:
        raise ElboxError("give at least one anomaly score method")
    for method in methods:
        if method not in METHODS:
            raise ElboxError(
                f"unknown anomaly score {short_repr(method)}; {did_you_mean(method, METHODS)}choose from "
                f"{', '.join(METHODS)}"
            )
        reason = why_not_applicable(model, method, background)
        if reason:
            raise ElboxError(f"--method {method} does not apply: {reason}")
    if background is not None:
        if tuple(background.config.data_shape) != tuple(model.config.data_shape):
            raise ElboxError(
                f"the background model takes examples of shape {tuple(background.config.data_shape)}, "
                f"the model {tuple(model.config.data_shape)}: train the background on the same data, "
                "perturbed"
            )
        if background.data_space != model.data_space:
            raise ElboxError(
                f"the background model reads data in the {background.data_space} space, the model in "
                f"{model.data_space}: train both with the same likelihood"
            )


def png_bits(images: Tensor, one_bit: bool = False) -> Tensor:
    """The PNG code length in bits [N] of images [N, C, H, W] (Pillow, compression level 9; the length includes PNG's
    fixed overhead of about 500 bits, the same for every image of a size): 8-bit grey for one channel, RGB for three,
    else the channels stacked as one grey image; one_bit: images of 0 and 1 in PNG's 1-bit mode (a binary model's
    input: in 8-bit mode PNG spends about 1.5 bits on each random binary pixel)."""
    arrays = images.cpu().numpy()
    bits = []
    for a in arrays:
        picture = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0) if a.shape[0] == 3 else a.reshape(-1, a.shape[-1])
        buffer = io.BytesIO()
        image = Image.fromarray(np.ascontiguousarray(picture.astype(bool if one_bit else np.uint8)))
        image.save(buffer, format="PNG", compress_level=9)
        bits.append(8 * buffer.getbuffer().nbytes)
    return torch.tensor(bits, dtype=torch.float64)


def p_values(scores: Tensor, reference: Tensor) -> Tensor:
    """The conformal p-value of each score [N] against reference scores [M] of normal data: (1 + #{reference >=
    score}) / (M + 1), the fraction of reference examples at least as extreme, counting the example itself. For an
    example drawn like the reference it is uniform on {1/(M+1), ..., 1}, so a threshold of 0.01 flags about 1 % of
    normal data (Vovk et al. 2005; Bates et al. 2023, "Testing for outliers with conformal p-values")."""
    if reference.numel() == 0:
        raise ElboxError("p-values need reference scores: the reference data are empty")
    ordered = reference.double().sort().values
    at_least = ordered.numel() - torch.searchsorted(ordered, scores.double(), right=False)
    return (1 + at_least).double() / (ordered.numel() + 1)


class AnomalyScorer:
    """Scores examples (as given: 8-bit images uint8 [N, *shape], or vectors in the run's units) with every method
    asked for. The typicality score needs the entropy estimate H: set `entropy` from reference data first
    (fit_reference)."""

    def __init__(
        self,
        model: LatentVariableModel,
        space: Any,
        methods: list[str],
        settings: ScoreSettings,
        background: LatentVariableModel | None = None,
    ):
        methods = method_list(methods)
        check_methods(model, methods, background)
        if "llr" in methods and settings.llr_k > model.config.levels:
            raise ElboxError(
                f"llr_k (--llr-k) {settings.llr_k} is more than the model's {model.config.levels} latent "
                f"levels: choose K from 0 to {model.config.levels}"
            )
        self.model, self.space, self.methods, self.settings, self.background = (
            model,
            space,
            methods,
            settings,
            background,
        )
        self.entropy: float | None = None

    def fit_reference(self, examples: Tensor, progress: bool = False) -> dict[str, Tensor]:
        """Scores of the reference data, after setting the entropy estimate H from their -log p(x)."""
        nll = -self._log_p(self.model, *self._inputs(examples), progress)
        self.entropy = nll.mean().item()
        return self.scores(examples, progress, nll=nll)

    def scores(self, examples: Tensor, progress: bool = False, nll: Tensor | None = None) -> dict[str, Tensor]:
        """{method: score [N] float64}, higher = more unusual."""
        if examples.shape[0] == 0:
            raise ElboxError("there are no examples to score")
        x, counts, seeds = self._inputs(examples)
        nll = -self._log_p(self.model, x, counts, seeds, progress) if nll is None else nll
        out: dict[str, Tensor] = {}
        for method in self.methods:
            if method == "likelihood":
                out[method] = nll
            elif method == "complexity":
                binary = self.space.name == "binary"  # the code of what the model reads: its binarizations
                code = example_means(png_bits(x.cpu() > 0.5, one_bit=True), counts) if binary else png_bits(examples)
                out[method] = nll / math.log(2) - code
            elif method == "typicality":
                if self.entropy is None:
                    raise ElboxError("typicality needs reference data to estimate the entropy (fit_reference)")
                out[method] = (nll - self.entropy).abs()
            elif method == "llr":
                out[method] = -nll - self._log_p(self.model, x, counts, seeds, progress, self.settings.llr_k)
            elif method == "regret":
                out[method] = self._regret(x, counts, seeds, progress)
            else:
                out[method] = self._log_p(self.background, x, counts, seeds, progress) + nll
        return out

    def _inputs(self, examples: Tensor) -> tuple[Tensor, list[int], list[int]]:
        x, counts, seeds = model_inputs(examples, self.space, self.settings.seed, self.settings.binarizations)
        return x.to(self.model.device), counts, seeds

    @torch.no_grad()
    def _log_p(
        self,
        model: LatentVariableModel,
        x: Tensor,
        counts: list[int],
        seeds: list[int],
        progress: bool,
        llr_k: int | None = None,
    ) -> Tensor:
        """log p(x) per example [N] (nats, of the 8-bit data), as `elbox score` gives it; with llr_k, the bound
        L^{>k} on the same draws of the levels above k (the same seeds and passes as log p(x))."""
        model = model.to(x.device).eval()
        offset = self.space.log_prob_offset(math.prod(x.shape[1:]))
        if isinstance(model, ExactLikelihood):  # in float64, as elbox score computes it
            model, x = copy.deepcopy(model).double(), x.double()
        if llr_k is None:
            s = self.settings
            return score_per_example(
                model, x, counts, seeds, offset, s.iw_samples, s.batch_size, s.elbo_samples, progress
            )[0]
        if not isinstance(model, ImportanceWeighted):
            raise ElboxError(f"the {model.name} model has no importance weights for the LLR bounds")

        def bound(rows: Tensor, max_elements: int) -> Tensor:
            return iwae_per_example(
                model,
                rows,
                self.settings.iw_samples,
                rows.shape[0],
                max_elements,
                sampler=lambda r: model.log_weights_above_sampler(r, llr_k),
            )

        return example_means(seeded_per_example(x, counts, seeds, bound, f"L^>{llr_k}", progress), counts, offset)

    def _regret(self, x: Tensor, counts: list[int], seeds: list[int], progress: bool) -> Tensor:
        """The regret of each example, many examples per refit (the refit is per example, and each example's draws
        come from its own generator seeded by it: SeededNoise), REGRET_PASS_ELEMENTS rows x samples x elements a
        pass."""
        from elbox.evaluation.tighten import (
            REFIT_SAMPLES,
            SeededNoise,
            likelihood_regret,
        )  # tighten imports the training loop

        per_pass = max(1, REGRET_PASS_ELEMENTS // (max(counts) * REFIT_SAMPLES * math.prod(x.shape[1:])))
        starts, parts = [0, *itertools.accumulate(counts)], []
        for first in examples_progress(len(counts), per_pass, "regret", progress):
            last = min(first + per_pass, len(counts))
            noise = SeededNoise(seeds[first:last], counts[first:last], x.device)
            parts.append(
                likelihood_regret(
                    self.model,
                    x[starts[first] : starts[last]],
                    self.settings.regret_steps,
                    n_samples=REFIT_SAMPLES,
                    noise=noise,
                )
            )
        return example_means(torch.cat(parts), counts)
