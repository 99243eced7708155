"""Progress bars for the long jobs (tqdm, on stderr, rate and ETA): a bar over a model's sampling steps, and the
estimated time left in a training run.

Models know no screen: a model reports its steps through a callback, on_step(done, total), and `step_bar` turns
such a callback into a bar.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:  # annotations only: progress bars know no model
    from elbox.models.base import LatentVariableModel

StepCallback = Callable[[int, int], None]  # on_step(steps done, steps in all)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "step", leave: bool = True) -> tqdm:
    """A tqdm bar on stderr with the house settings (disabled: draws nothing)."""
    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=leave, file=sys.stderr
    )


@contextmanager
def step_bar(desc: str, enabled: bool = True, unit: str = "step") -> Iterator[StepCallback]:
    """An on_step(done, total) callback that draws a bar (opened at the first call, closed on leaving the block)."""
    shown: list[tqdm] = []

    def on_step(done: int, total: int) -> None:
        if not shown:
            shown.append(progress_bar(total, desc, enabled, unit))
        shown[0].update(done - shown[0].n)

    try:
        yield on_step
    finally:
        for opened in shown:
            opened.close()


def reports_steps(model: LatentVariableModel) -> bool:
    """Whether model.sample takes an on_step callback (a sampler with many network passes: the diffusion model)."""
    return "on_step" in inspect.signature(model.sample).parameters


def sample_with_progress(model: LatentVariableModel, n: int, progress: bool, **options) -> Tensor:
    """model.sample(n, **options), with a "sampling" bar over its steps where the model reports them."""
    if not reports_steps(model):
        return model.sample(n, **options)
    with step_bar(f"sampling {n}", progress) as on_step:
        return model.sample(n, on_step=on_step, **options)


def time_left(elapsed_s: float, done: int, left: int) -> str:
    """The time for `left` more units at the mean pace of the `done` ones so far, as tqdm writes intervals
    ("?" before the first is done)."""
    if done <= 0:
        return "?"
    return tqdm.format_interval(elapsed_s / done * max(left, 0))
