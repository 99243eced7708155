"""Per-example estimates of a model's bounds over a dataset, in passes bounded by memory: the ELBO, IWAE-K,
exact log p(x), a score per example (seeded per example), and active units. The evaluator
(elbox.evaluation.evaluator) and the trainer's validation both use them.

Per-example scores (`score_per_example`, behind `elbox score`) draw each example's samples from a generator seeded
for that example alone, so a score does not depend on the other examples scored with it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from elbox.core.bounds import iwae_bounds
from elbox.core.errors import ElboxError
from elbox.core.system import available_memory_bytes
from elbox.models.base import (
    ExactLikelihood,
    ImportanceWeighted,
    LatentVariableModel,
)

LOG = logging.getLogger(__name__)  # shown by elbox.core.log's handler

ACTIVE_UNIT_THRESHOLD = 0.01
# The memory bound of one evaluation pass, in decoder output elements (samples x examples x elements per sample).
# On a CPU: 2**20 (4 MiB of float32 per temporary) keeps an MLP's temporaries in cache: IWAE ran 20 % faster than
# with 2**22 for the MLP VAE and the 2-level HVAE, the same at 2**19 and 2**21 (benchmarks/reproduce/README.md, "The
# cost of IWAE-5000"; 2**25 was 1.3x slower than 2**22). Convolutional nets want batches of images: at least
# CPU_MIN_PASS_IMAGES per pass (the conv HVAE's IWAE ran 1.5x faster with 112 images per pass than with 28, and
# slower again with 448).
CPU_MAX_DECODER_ELEMENTS = 2**20
CPU_MIN_PASS_IMAGES = 128
# float32 temporaries of decoder-output size alive at once in a pass (activations, logits, log-density terms),
# with headroom: the bound allots each pass at most 1/LIVE_TEMPORARIES of the memory available
LIVE_TEMPORARIES = 16


def memory_bound(device: torch.device, elements_per_image: int = 0) -> int:
    """Decoder output elements per evaluation pass, from the memory available now on the device. CPUs: the larger
    of CPU_MAX_DECODER_ELEMENTS and CPU_MIN_PASS_IMAGES images of `elements_per_image`, less when memory is short;
    GPUs: half the free memory."""
    share = available_memory_bytes(device) // (4 * LIVE_TEMPORARIES)  # elements per temporary, all of memory
    if device.type == "cuda":
        return max(2**16, share // 2)
    return max(2**16, min(max(CPU_MAX_DECODER_ELEMENTS, CPU_MIN_PASS_IMAGES * elements_per_image), share))


@torch.no_grad()
def elbo_per_example(
    model: LatentVariableModel,
    x: Tensor,
    batch_size: int,
    n_samples: int = 1,
    progress: bool = False,
    final: bool = True,
    max_decoder_elements: int | None = None,
) -> dict[str, Tensor]:
    """Per-example ELBO terms over a whole split: 'elbo', 'reconstruction', 'kl' and 'kl/<group>' [N].

    Each pass takes up to batch_size examples with all their n_samples samples, fewer when examples x samples would
    exceed the memory bound (pass_bound: memory_bound for the model and device by default).
    final: use the model's `elbo_for_evaluation` where it has one (the discrete-time diffusion model's exact sum
    over all T steps, T passes per example); False uses `elbo`, an unbiased cheaper estimate (validation)."""
    elbo = model.elbo_for_evaluation if final else model.elbo
    bound = pass_bound(model, x, max_decoder_elements)
    batch_size = max(1, min(batch_size, bound // (n_samples * elements_per_sample(model))))
    parts: dict[str, list[Tensor]] = {}
    for start in examples_progress(x.shape[0], batch_size, "ELBO", progress):
        terms = elbo(x[start : start + batch_size], n_samples=n_samples)
        values = {"elbo": terms.elbo, "reconstruction": terms.reconstruction, "kl": terms.kl_total}
        values.update({f"kl/{name}": v for name, v in terms.kl.items()})
        for key, v in values.items():
            parts.setdefault(key, []).append(v.double().cpu())
    return {key: torch.cat(v) for key, v in parts.items()}


def examples_progress(n: int, batch_size: int, desc: str, progress: bool):
    """Start indices of the batches of n examples, with a progress bar counted in examples (rate and ETA)."""
    with tqdm(total=n, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            yield start
            bar.update(min(batch_size, n - start))


def count_active(means: Tensor) -> tuple[int, Tensor]:
    """Units whose posterior mean varies over examples: Var_x E_q[z_u] > 0.01, for means [N, d].
    Returns (count, variances)."""
    variances = means.var(0) if means.shape[0] > 1 else torch.zeros(means.shape[1:], dtype=torch.float64)
    return int((variances > ACTIVE_UNIT_THRESHOLD).sum()), variances


@torch.no_grad()
def active_units(model: LatentVariableModel, x: Tensor, batch_size: int) -> tuple[int, Tensor]:
    """Active units of the model's encoding (count_active). Returns (count, variances)."""
    means = torch.cat([model.encode(x[s : s + batch_size]).double().cpu() for s in range(0, x.shape[0], batch_size)])
    return count_active(means)


@torch.no_grad()
def active_units_by_level(model: LatentVariableModel, x: Tensor, batch_size: int) -> dict[str, tuple[int, int]]:
    """For hierarchical models (encode_levels): {level: (active units, units)}."""
    parts: dict[str, list[Tensor]] = {}
    for s in range(0, x.shape[0], batch_size):
        for name, means in model.encode_levels(x[s : s + batch_size]).items():
            parts.setdefault(name, []).append(means.double().cpu())
    return {name: (count_active(torch.cat(v))[0], torch.cat(v).shape[1]) for name, v in parts.items()}


def elements_per_sample(model: LatentVariableModel) -> int:
    """Memory one sample of one example costs in a pass, in float32 elements: its likelihood parameters, or the
    model's largest per-sample activation (activation_elements(), for models whose hidden state is larger than
    their output) if that is bigger."""
    return max(math.prod(model.config.data_shape) * model.likelihood_params(), model.activation_elements())


def pass_bound(model: LatentVariableModel, x: Tensor, max_decoder_elements: int | None) -> int:
    """The memory bound given, else memory_bound for this model on x's device."""
    return memory_bound(x.device, elements_per_sample(model)) if max_decoder_elements is None else max_decoder_elements


def samples_per_pass(model: LatentVariableModel, batch: int, max_decoder_elements: int) -> int:
    """How many importance samples for a batch of examples fit one pass under the memory bound."""
    return max(1, max_decoder_elements // (batch * elements_per_sample(model)))


@torch.no_grad()
def iwae_by_k_per_example(
    model: LatentVariableModel,
    x: Tensor,
    ks: Sequence[int],
    batch_size: int,
    max_decoder_elements: int | None = None,
    progress: bool = False,
    sampler: Callable[[Tensor], Callable[[int], Tensor]] | None = None,
    compile: bool = False,
) -> dict[int, Tensor]:
    """IWAE-K lower bounds on log p(x) for every example and every K in ks: {K: [N] float64}.

    One stream of max(ks) samples per example serves every K (the first K samples give IWAE-K). sampler(x) gives the
    function drawing n log weights [n, B] (default: the model's log_weights_sampler; another bound's, e.g. L^{>k}).
    compile: torch.compile that function, static shapes (a graph per pass size, reused by every batch of that size:
    the batches' closures differ only in their tensors); the compiled draws come from inductor's own generator.
    """
    parts: dict[int, list[Tensor]] = {k: [] for k in sorted(set(ks))}
    max_decoder_elements = pass_bound(model, x, max_decoder_elements)
    k_max = max(parts)
    # the bar counts examples, and moves with each pass of samples: a batch at K = 5000 takes minutes
    with tqdm(
        total=x.shape[0],
        desc=f"IWAE-{k_max}",
        unit="ex",
        disable=not progress,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
    ) as bar:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            chunk = samples_per_pass(model, xb.shape[0], max_decoder_elements)
            draws = (sampler or model.log_weights_sampler)(xb)
            draws = torch.compile(draws, dynamic=False) if compile else draws

            def draw(n: int, draws=draws, rows: int = xb.shape[0]) -> Tensor:
                log_w = draws(n)
                bar.update(rows * n / k_max)
                return log_w

            for k, v in iwae_bounds(draw, list(parts), chunk).items():
                parts[k].append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def iwae_per_example(
    model: LatentVariableModel,
    x: Tensor,
    k: int,
    batch_size: int,
    max_decoder_elements: int | None = None,
    progress: bool = False,
    sampler: Callable[[Tensor], Callable[[int], Tensor]] | None = None,
) -> Tensor:
    """IWAE-K lower bound on log p(x) for every example [N], float64 (sampler: see iwae_by_k_per_example)."""
    return iwae_by_k_per_example(model, x, [k], batch_size, max_decoder_elements, progress, sampler)[k]


def is_out_of_memory(error: BaseException) -> bool:
    """True for the errors PyTorch and Python raise when an allocation fails (GPU or CPU)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and ("out of memory" in str(error) or "not enough memory" in str(error))


def retry_on_out_of_memory(run, what: str):
    """Call run(divisor) with divisor 1, 2, 4, ... while it runs out of memory; `run` divides its batch size and
    memory bound by the divisor. ElboxError once a batch of one example does not fit."""
    divisor = 1
    while True:
        try:
            return run(divisor)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            if divisor >= 2**20:
                raise ElboxError(f"{what}: out of memory even with the smallest chunks") from None
            divisor *= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            LOG.info(f"{what} ran out of memory; retrying with chunks 1/{divisor} the size")


# Samples x examples x elements of one scoring pass: fixed, not read from the memory free now, because how many
# samples a pass draws changes the draws; so an image's score is the same on every call (on one kind of device), and
# in every version since scores were seeded (the evaluation's bound was 2**22 then: CPU_MAX_DECODER_ELEMENTS).
SCORE_PASS_ELEMENTS = 2**22


@torch.no_grad()
def score_per_example(
    model: LatentVariableModel,
    x: Tensor,
    counts: list[int],
    seeds: list[int],
    log_prob_offset: float,
    iw_samples: int,
    batch_size: int,
    elbo_samples: int = 1,
    progress: bool = False,
) -> tuple[Tensor, Tensor, str]:
    """The tightest per-example estimate of log p(x) the model has, and its name: the exact log p(x), else IWAE-K,
    else the ELBO. x holds the model inputs of N examples, counts[i] consecutive rows for example i (its
    binarizations; else one row). Each example's importance samples (or ELBO samples) are drawn from the global
    generator seeded with seeds[i], one example at a time with all its rows and samples batched into passes of a
    fixed size (SCORE_PASS_ELEMENTS), so its value depends on nothing else in x; models without randomness
    (exact log p(x)) run in batches of batch_size rows. Returns (mean over each example's rows [N] float64 nats,
    standard error of that mean [N] (NaN for one row), the name). Retries with smaller passes when memory runs out
    (smaller passes draw other samples)."""
    model.eval()
    if isinstance(model, ExactLikelihood):
        values = retry_on_out_of_memory(lambda d: log_prob_per_example(model, x, max(1, batch_size // d)), "scoring")
        name = "exact log p(x)"
    else:
        iw = isinstance(model, ImportanceWeighted)
        name = f"IWAE-{iw_samples} lower bound" if iw else f"ELBO lower bound ({model.elbo_protocol(elbo_samples)})"

        def one(rows: Tensor, bound: int) -> Tensor:
            if iw:
                return iwae_per_example(model, rows, iw_samples, rows.shape[0], bound)
            return elbo_per_example(model, rows, rows.shape[0], elbo_samples, max_decoder_elements=bound)["elbo"]

        values = seeded_per_example(x, counts, seeds, one, name.split(" ")[0], progress)
    groups = (values + log_prob_offset).split(counts)
    stderr = torch.stack([g.std() / math.sqrt(len(g)) if len(g) > 1 else g.new_tensor(math.nan) for g in groups])
    return example_means(values, counts, log_prob_offset), stderr, name


def example_means(values: Tensor, counts: list[int], offset: float = 0.0) -> Tensor:
    """The mean of each example's rows [N] (counts[i] consecutive rows of values for example i), plus offset."""
    return torch.stack([g.mean() for g in (values + offset).split(counts)])


def seeded_per_example(
    x: Tensor,
    counts: list[int],
    seeds: list[int],
    one: Callable[[Tensor, int], Tensor],
    what: str,
    progress: bool = False,
) -> Tensor:
    """one(rows, pass bound) [rows] for each example's rows in x (counts[i] consecutive rows for example i), the
    global generator seeded with seeds[i] first, passes bounded by SCORE_PASS_ELEMENTS (smaller when memory runs
    out): so each example's value depends on nothing else in x. Returns the values of all rows, in order."""
    parts, starts = [], [0, *itertools.accumulate(counts)]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for i in examples_progress(len(counts), 1, what, progress):
            rows = x[starts[i] : starts[i + 1]]

            def seeded(divisor: int, rows: Tensor = rows, seed: int = seeds[i]) -> Tensor:
                torch.manual_seed(seed)
                return one(rows, max(1, SCORE_PASS_ELEMENTS // divisor))

            parts.append(retry_on_out_of_memory(seeded, what))
    return torch.cat(parts)


def check_model_input(model: LatentVariableModel, x: Tensor, what: str = "data") -> Tensor:
    """x as the model takes it, float32 [N, *data_shape] in its data space (finite; 0 or 1 for a binary model; in
    [0, 1] for the other image spaces); one ElboxError naming what is wrong otherwise."""
    shape, space = tuple(model.config.data_shape), model.data_space
    wanted = f"float tensor [N, {', '.join(map(str, shape))}] in the model's {space} data space"
    hint = "; give 8-bit images (uint8) to elbox.evaluate, elbox.score or elbox.encode, which transform them"
    if not isinstance(x, Tensor):
        raise ElboxError(f"{what} is a {type(x).__name__}; the evaluator takes a {wanted}{hint}")
    if not x.is_floating_point():
        raise ElboxError(f"{what} has dtype {x.dtype}; the evaluator takes a {wanted}{hint if space != 'real' else ''}")
    if tuple(x.shape[1:]) != shape:
        raise ElboxError(f"{what} has shape {tuple(x.shape)}; the model takes a {wanted}")
    if not torch.isfinite(x).all():
        raise ElboxError(f"{what} contains NaN or infinite values")
    if space == "binary" and not ((x == 0) | (x == 1)).all():
        raise ElboxError(
            f"{what} has values other than 0 and 1 (grey values?); the {model.name} model's Bernoulli "
            f"likelihood needs binary data{hint} (binarized with a seed)"
        )
    if space in ("continuous", "discrete") and x.numel() and (x.min() < 0 or x.max() > 1):
        raise ElboxError(
            f"{what} has values in [{x.min().item():.4g}, {x.max().item():.4g}]; the model's {space} "
            "data space lies in [0, 1]"
        )
    return x.float()


@torch.no_grad()
def log_prob_per_example(model: LatentVariableModel, x: Tensor, batch_size: int) -> Tensor:
    """Exact log p(x) [N], float64, for models that have it."""
    return torch.cat([model.log_prob(x[s : s + batch_size]).double().cpu() for s in range(0, x.shape[0], batch_size)])
