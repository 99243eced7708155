"""The evaluator: ELBO and its terms, the IWAE-K NLL estimate, bits/dim and active units.

Protocol (IWAE-K of Burda et al. 2016; the -D ln 256 dequantization bound of Theis et al. 2016): every number is
a per-example value averaged over the examples of the split, with its standard error over examples. Values are nats
per example, summed over data dimensions; bits/dim = NLL / (D ln 2). For a continuous space (dequantized 8-bit data)
the reported bounds include the -D ln 256 correction, so they bound the log-probability of the 8-bit data. The ELBO
is always reported with beta = 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from elbox.core.bounds import mean_and_stderr
from elbox.core.command_options import EvaluateOptions
from elbox.core.errors import ElboxError
from elbox.models.base import (
    Encoder,
    ExactLikelihood,
    Hierarchical,
    ImportanceWeighted,
    LatentVariableModel,
    LowerBounded,
)
from elbox.models.estimates import (
    active_units,
    active_units_by_level,
    check_model_input,
    elbo_per_example,
    iwae_by_k_per_example,
    log_prob_per_example,
    pass_bound,
    retry_on_out_of_memory,
)


def evaluate(
    model: LatentVariableModel,
    x: Tensor,
    log_prob_offset: float = 0.0,
    iw_samples: int | Sequence[int] = EvaluateOptions.iw_samples,
    batch_size: int = EvaluateOptions.batch_size,
    elbo_samples: int = EvaluateOptions.elbo_samples,
    seed: int = EvaluateOptions.seed,
    max_decoder_elements: int | None = None,
    progress: bool = False,
    compile: bool = EvaluateOptions.compile,
) -> dict:
    """Evaluate a model on data `x` already in the model's data space; report whatever the model has.

    - ELBO and its terms (models with `elbo`), IWAE-K NLL for every K in iw_samples (models with
      `log_weights`), exact NLL (models with `log_prob`), active units (models with `encode`).
    - Gaps, each the mean of a per-example paired difference with its standard error:
      gap_elbo_iw = -ELBO - NLL_K (largest K), gap_elbo = -ELBO - NLL_exact (= mean KL(q || p(z|x))),
      gap_iw = NLL_K - NLL_exact; and the same by K.
    log_prob_offset: nats added to every log-density so it is a log-probability of the 8-bit data
    (-D ln 256 for dequantized data, 0 otherwise). Returns a JSON-ready dict (with the model's data_space); `nll_iw` and
    `bpd` are for the largest K; `bpd` comes from the tightest bound there is (exact NLL, else IWAE, else the ELBO,
    named in `bpd_source`), and `bpd_<part>` splits -ELBO in bits/dim into its terms (recon and each group).
    compile: torch.compile the importance-sampling passes (iwae_by_k_per_example).
    """
    ks = sorted(set([iw_samples] if isinstance(iw_samples, int) else iw_samples))
    x = check_model_input(model, x)
    if x.shape[0] == 0:
        raise ElboxError("cannot evaluate on an empty dataset")
    if not ks or ks[0] < 1:
        raise ElboxError(f"--iw-samples must be >= 1, got {iw_samples}")
    if batch_size < 1:
        raise ElboxError(f"the evaluation batch size must be >= 1, got {batch_size}")
    model.eval()
    bound = pass_bound(model, x, max_decoder_elements)
    num_dims = math.prod(x.shape[1:])
    bits = num_dims * math.log(2)
    start_time = time.perf_counter()
    result: dict = {
        "n_examples": x.shape[0],
        "num_dims": num_dims,
        "units": "nats per example (bpd: bits per dimension)",
        "log_prob_offset": log_prob_offset,
        "seed": seed,
        "compile": compile,  # compiled importance sampling draws other samples for the same seed
        "data_space": model.data_space,
    }
    elbo = nll_exact = None
    nll_by_k: dict[int, Tensor] = {}
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        if isinstance(model, ExactLikelihood):
            log_p = retry_on_out_of_memory(
                lambda d: log_prob_per_example(model, x, max(1, batch_size // d)), "evaluation"
            )
            nll_exact = -(log_p + log_prob_offset)
            result["nll_exact"], result["nll_exact_stderr"] = mean_and_stderr(nll_exact)
        if isinstance(model, LowerBounded):
            terms = retry_on_out_of_memory(
                lambda d: elbo_per_example(
                    model, x, max(1, batch_size // d), elbo_samples, progress, max_decoder_elements=max(1, bound // d)
                ),
                "evaluation",
            )
            elbo = terms["elbo"] + log_prob_offset
            result["elbo_samples"] = elbo_samples
            result["elbo_protocol"] = model.elbo_protocol(elbo_samples)
            result["elbo"], result["elbo_stderr"] = mean_and_stderr(elbo)
            result["reconstruction"], _ = mean_and_stderr(terms["reconstruction"] + log_prob_offset)
            result["kl"], _ = mean_and_stderr(terms["kl"])
            result["kl_by_group"] = {k[3:]: v.mean().item() for k, v in terms.items() if k.startswith("kl/")}
            # False when some group terms are Monte Carlo log q - log p estimates, not KLs (the Markov HVAE)
            result["kl_by_group_are_kls"] = not model.inexact_kl_terms
            result["bpd_elbo"], result["bpd_elbo_stderr"] = -result["elbo"] / bits, result["elbo_stderr"] / bits
            # -ELBO in bits/dim, term by term: bpd_recon + sum over groups of bpd_<group> = bpd_elbo
            parts = {"recon": -(terms["reconstruction"] + log_prob_offset)}
            parts.update({k[3:]: v for k, v in terms.items() if k.startswith("kl/")})
            for name, v in parts.items():
                result[f"bpd_{name}"], result[f"bpd_{name}_stderr"] = mean_and_stderr(v / bits)
            result["bpd_parts"] = list(parts)
        if isinstance(model, ImportanceWeighted):
            bounds = retry_on_out_of_memory(
                lambda d: iwae_by_k_per_example(
                    model, x, ks, max(1, batch_size // d), max(1, bound // d), progress, compile=compile
                ),
                "evaluation",
            )
            nll_by_k = {k: -(v + log_prob_offset) for k, v in bounds.items()}
            result["iw_samples"] = ks[-1]
            result["nll_iw_by_k"] = {k: mean_and_stderr(v)[0] for k, v in nll_by_k.items()}
            result["nll_iw_stderr_by_k"] = {k: mean_and_stderr(v)[1] for k, v in nll_by_k.items()}
            result["nll_iw"], result["nll_iw_stderr"] = (
                result["nll_iw_by_k"][ks[-1]],
                result["nll_iw_stderr_by_k"][ks[-1]],
            )
            result["bpd"], result["bpd_stderr"] = result["nll_iw"] / bits, result["nll_iw_stderr"] / bits
            result["bpd_source"] = f"IWAE, K={ks[-1]}"
        if isinstance(model, Hierarchical):  # encode() is the levels concatenated: count once, per level
            by_level = active_units_by_level(model, x, batch_size)
            result["active_units_by_level"] = {name: n for name, (n, _) in by_level.items()}
            result["latent_dim_by_level"] = {name: d for name, (_, d) in by_level.items()}
            result["active_units"] = sum(result["active_units_by_level"].values())
            result["latent_dim"] = sum(result["latent_dim_by_level"].values())
        elif isinstance(model, Encoder):
            result["active_units"], variances = active_units(model, x, batch_size)
            result["latent_dim"] = variances.numel()
    if nll_exact is not None:
        result["bpd"], result["bpd_stderr"], result["bpd_source"] = (
            result["nll_exact"] / bits,
            result["nll_exact_stderr"] / bits,
            "exact",
        )
    elif "bpd" not in result and "bpd_elbo" in result:  # the ELBO is the only bound (diffusion)
        result["bpd"], result["bpd_stderr"], result["bpd_source"] = (
            result["bpd_elbo"],
            result["bpd_elbo_stderr"],
            "ELBO",
        )
    # paired gaps, each >= 0 in expectation
    if elbo is not None and nll_by_k:
        gaps = {k: mean_and_stderr(-elbo - v) for k, v in nll_by_k.items()}
        result["gap_elbo_iw_by_k"] = {k: g[0] for k, g in gaps.items()}
        result["gap_elbo_iw_stderr_by_k"] = {k: g[1] for k, g in gaps.items()}
        result["gap_elbo_iw"], result["gap_elbo_iw_stderr"] = gaps[ks[-1]]
    if elbo is not None and nll_exact is not None:
        result["gap_elbo"], result["gap_elbo_stderr"] = mean_and_stderr(-elbo - nll_exact)
    if nll_exact is not None and nll_by_k:
        gaps = {k: mean_and_stderr(v - nll_exact) for k, v in nll_by_k.items()}
        result["gap_iw_by_k"] = {k: g[0] for k, g in gaps.items()}
        result["gap_iw_stderr_by_k"] = {k: g[1] for k, g in gaps.items()}
        result["gap_iw"], result["gap_iw_stderr"] = gaps[ks[-1]]
    result["time_s"] = time.perf_counter() - start_time
    return result


# nats are printed to 3 decimals: a gap below this prints as 0.000
