"""Training settings: TrainConfig (saved as the "train" section of a run's config.json) and the data options.

Every option is declared once here, with its default, range, choices and help; `elbox train` generates its
command line from these declarations. A model may default some training options differently
(LatentVariableModel.training_defaults: the VAE's were chosen by time to quality, the HVAE's (per type) by
likelihood in the same time, benchmarks/results/summary.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from elbox.core.bounds import IWAE_ESTIMATORS
from elbox.core.errors import ElboxError
from elbox.core.options import MAX_SEED, check_options, config_from_dict, option
from elbox.data import dataset_names
from elbox.io.loggers import LOGGERS
from elbox.models.base import model_class

BETA_SCHEDULES = ("constant", "linear", "cyclical")
OBJECTIVES = ("elbo", "iwae")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
# Size bounds: generous, yet what one machine can run
MAX_EPOCHS = 10**6
MAX_BATCH = 10**6  # examples per batch
MAX_SAMPLES = 10**5  # Monte Carlo or importance samples per example
MAX_IMAGE_SIZE = 8192
MAX_WORKERS = 256


@dataclass
class TrainConfig:
    epochs: int = option(10, "passes over the training set", minimum=1, maximum=MAX_EPOCHS)
    batch_size: int = option(
        128, "examples per optimizer step (the global batch under torchrun)", minimum=1, maximum=MAX_BATCH
    )
    lr: float = option(1e-3, "Adam learning rate", above=0)
    weight_decay: float = option(
        0.0,
        "decoupled weight decay (AdamW): each step shrinks every weight by lr times this; 0: plain Adam",
        minimum=0,
        maximum=1,
    )
    seed: int = option(
        0, "seed of the initialization, the batches and the data randomness", minimum=0, maximum=MAX_SEED
    )
    objective: str = option(
        "elbo",
        "training objective: elbo (beta-weighted, optional free bits) or iwae (IWAE-K; see --iw-samples, --estimator)",
        choices=OBJECTIVES,
    )
    beta: float = option(1.0, "KL weight of the elbo training objective (reports always use 1)", minimum=0)
    beta_schedule: str = option(
        "constant",
        "linear: beta rises from 0 over --warmup-epochs; cyclical: see --cycle-epochs",
        choices=BETA_SCHEDULES,
    )
    warmup_epochs: float = option(0.0, "epochs of linear beta warm-up", minimum=0, maximum=MAX_EPOCHS)
    cycle_epochs: float = option(
        0.0,
        "length in epochs of one cycle of the cyclical beta schedule (required with --beta-schedule cyclical)",
        minimum=0,
        maximum=MAX_EPOCHS,
    )
    cycle_ramp_fraction: float = option(
        0.5, "fraction of each cycle over which beta rises from 0 to --beta (cyclical)", above=0, maximum=1
    )
    free_bits: float = option(
        0.0,
        "floor in nats on the batch-mean KL of each latent group (the whole z for the VAE); elbo objective only",
        minimum=0,
        metavar="NATS",
    )
    n_samples: int = option(1, "Monte Carlo samples of z per example while training", minimum=1, maximum=MAX_SAMPLES)
    iw_samples: int = option(
        1,
        "importance samples K per example of the iwae training objective (K=1: ELBO with a Monte Carlo KL)",
        minimum=1,
        maximum=MAX_SAMPLES,
        metavar="K",
    )
    estimator: str = option(
        "reparam",
        "gradient estimator of the iwae objective: reparam, stl (sticking the landing) "
        "or dreg (doubly reparameterized)",
        choices=IWAE_ESTIMATORS,
    )
    max_nonfinite: int = option(
        20,
        "stop when this many of the last 2N optimizer steps had a non-finite loss or gradient (counted across epochs)",
        minimum=1,
        maximum=10**6,
        metavar="N",
    )
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: off)", minimum=0)
    normalize_gradients: bool = option(
        False,
        "divide each parameter tensor's gradient by its L2 norm before the "
        "optimizer step (the VampPrior code's AdamNormGrad)",
    )
    perturb: float = option(
        0.0,
        "train a background model for the likelihood-ratio anomaly score (Ren et al. 2019): "
        "each 8-bit value of a training batch is replaced, with this probability, by one drawn "
        "uniformly from 0..255 (e.g. 0.2; 0: off)",
        minimum=0,
        maximum=1,
        metavar="RATE",
    )
    patience: int | None = option(
        None,
        "early stopping: stop when the validation bound (the ELBO; IWAE-K under --objective iwae with K > 1) has "
        "not improved for N validated epochs, counted once the KL warm-up is over; best.safetensors keeps the best "
        "epoch, which evaluate then uses (default: off)",
        minimum=1,
        maximum=10**6,
        metavar="N",
    )
    init_from: str | None = option(
        None,
        "start from the weights of this run directory (its best epoch if it was trained with --patience, else its "
        "last) instead of a fresh initialization, e.g. to fine-tune with another objective; the model options must be "
        "the run's",
        metavar="RUN_DIR",
    )
    grad_skip_threshold: float = option(
        0.0, "skip updates whose gradient norm exceeds this (counted and logged; 0: off)", minimum=0, metavar="NORM"
    )
    lr_schedule: str = option("constant", "cosine: decay the learning rate to 0 over the run", choices=LR_SCHEDULES)
    ema_decay: float = option(
        0.0,
        "keep an exponential moving average of the weights (e.g. 0.999) for validation and "
        "the saved model, its decay warmed up as min(DECAY, (1 + n) / (10 + n)) after n "
        "steps; 0: off",
        minimum=0,
        below=1,
        metavar="DECAY",
    )
    eval_batch_size: int = option(1000, "examples per validation pass", minimum=1, maximum=MAX_BATCH)
    max_steps: int | None = option(
        None,
        "quick runs: stop after N optimizer steps in all (the epoch reaching N ends "
        "there, is validated and checkpointed; the run is then complete)",
        minimum=1,
        maximum=MAX_SEED,
        metavar="N",
    )
    val_limit: int | None = option(
        None, "quick runs: validate on the first N validation examples only (default: all)", minimum=1, metavar="N"
    )
    val_every: int = option(
        1,
        "validate every N epochs and after the last; epochs in between are still checkpointed "
        "(model.safetensors, state.safetensors; best.safetensors changes on validated epochs "
        "only) and recorded in metrics.jsonl as kind train_epoch",
        minimum=1,
        maximum=MAX_EPOCHS,
        metavar="N",
    )
    samples: bool = option(
        True, "write samples.png at the end of a run on images (a diffusion model samples with 256 steps or its T)"
    )
    log_every: int = option(50, "optimizer steps between training records in metrics.jsonl", minimum=1, maximum=10**9)
    checkpoint_minutes: float = option(
        10.0,
        "within a long epoch, also save the training state (state-in-epoch.safetensors) every M minutes, so that "
        "--resume continues from there, bit for bit; 0: at epoch ends only (may change on --resume)",
        minimum=0,
        maximum=10**6,
        metavar="M",
    )
    logger: str = option(
        "jsonl",
        "training curves: metrics.jsonl (jsonl), plus TensorBoard events in "
        "RUN_DIR/tensorboard (tensorboard), or neither (none; they stay in the checkpoint "
        "state)",
        choices=LOGGERS,
    )
    precision: str = option(
        "fp32",
        "bf16: autocast the training forward pass to bfloat16 (weights, optimizer state and "
        "reported bounds stay float32)",
        choices=PRECISIONS,
    )
    compile: bool = option(
        False,
        "torch.compile the training step's forward and backward (costs compilation time up "
        "front; measured 0-14% faster on 2 CPU cores, see benchmarks/results/speed.md)",
    )
    channels_last: bool = option(
        False,
        "convolutional models: NHWC memory layout for weights and batches (on 2 CPU "
        "cores: 1.04-1.27x for the conv HVAE, none for the diffusion U-Net)",
    )

    def __post_init__(self):
        check_options(self)
        if self.beta_schedule == "cyclical" and self.cycle_epochs <= 0:
            raise ElboxError(
                f"the cyclical beta schedule needs cycle_epochs > 0 (the length of one cycle in epochs), "
                f"got {self.cycle_epochs}"
            )
        self._check_objective_options()

    def _check_objective_options(self) -> None:
        """Reject options that the chosen objective would silently ignore."""
        if self.objective == "iwae":
            elbo_only = [
                (self.beta != 1.0, f"beta={self.beta}"),
                (self.beta_schedule != "constant", f"beta_schedule={self.beta_schedule!r}"),
                (self.free_bits != 0.0, f"free_bits={self.free_bits}"),
                (self.n_samples != 1, f"n_samples={self.n_samples} (use iw_samples for K)"),
            ]
            used = [what for is_set, what in elbo_only if is_set]
            if used:
                raise ElboxError(
                    f"{', '.join(used)}: beta, its schedules, free bits and n_samples apply to the elbo objective "
                    "only; "
                    "the iwae objective has no KL term to weight"
                )
        elif self.iw_samples != 1 or self.estimator != "reparam":
            raise ElboxError(
                f"iw_samples={self.iw_samples}, estimator={self.estimator!r}: these apply to the iwae objective only; "
                "set objective='iwae' (iw_samples=1 trains the ELBO with a Monte Carlo KL and that estimator)"
            )


@dataclass
class DataConfig:
    """What a run trains on (the "data" section of config.json records it with its data space)."""

    data: str | None = option(
        "fashion-mnist",
        f"a built-in dataset ({', '.join(dataset_names())}) or a path: a folder of "
        "images, an .npy/.npz array, a .csv/.parquet table (None: given in memory)",
        metavar="NAME|PATH",
    )
    validation: str | None = option(
        None,
        "your own validation data, in the same form as --data (default: hold out "
        "--validation-fraction of it at random)",
        metavar="PATH",
    )
    validation_fraction: float = option(
        0.1,
        "fraction of your own data held out at random (seeded) for validation; "
        "0: none, the training data serve as validation data",
        minimum=0,
        below=1,
    )
    data_dir: str | None = option(
        None,
        "directory with a built-in dataset's files (else $ELBOX_DATA, the user cache, "
        "the system's data packages, a download)",
        metavar="DIR",
    )
    limit_train: int | None = option(None, "use only the first N training examples", minimum=1, metavar="N")
    image_size: list[int] | None = option(
        None,
        "resize (shorter side) and center-crop a folder's images to this size: S or H W (default: all images one size)",
        minimum=1,
        maximum=MAX_IMAGE_SIZE,
        max_items=2,
        metavar="S",
    )
    columns: list[str] | None = option(
        None, "table columns to model, in this order (default: every column)", max_items=10**6, metavar="NAME"
    )
    validation_size: int | None = option(
        None,
        "a built-in dataset's validation split: the last N images of its official "
        "training set (default: 5000; 10000 gives the 50,000 / 10,000 split of the "
        "VampPrior papers)",
        minimum=1,
        metavar="N",
    )
    workers: int = option(
        1,
        "DataLoader processes reading files from disk (0: read in the training process)",
        minimum=0,
        maximum=MAX_WORKERS,
    )

    def __post_init__(self):
        check_options(self)
        if self.image_size is not None and len(self.image_size) not in (1, 2):
            raise ElboxError(f"image_size takes one size S or two, H W; got {self.image_size}")
        if self.image_size is not None and len(self.image_size) == 1:  # S means S x S
            self.image_size = [self.image_size[0]] * 2


def train_defaults(model: str | type, model_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TrainConfig values that `model` (a registered name or a model class), with the model options
    `model_values`, defaults to differently."""
    cls = model_class(model) if isinstance(model, str) else model
    return cls.training_defaults(model_values or {})


def train_config(
    model: str | type, values: dict[str, Any] | None = None, model_values: dict[str, Any] | None = None
) -> TrainConfig:
    """TrainConfig from the model's training defaults (given its options `model_values`) overridden by `values`
    (JSON or keyword values)."""
    return config_from_dict(TrainConfig, {**train_defaults(model, model_values), **(values or {})}, "training settings")


def config_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
