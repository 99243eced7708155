"""Training and validation batches, from images held in memory or streamed from disk.

Training data are either a tensor (uint8 images [N, C, H, W] or float32 vectors [N, D], gathered by index on the
device) or a map-style torch Dataset of such items (users' files, read on demand by DataLoader worker processes, so
memory does not grow with the dataset). Both follow one order: elbox.data.iterate_batches over the shuffle generator, so
a run on a Dataset sees the same batches as on the same images in memory, and resuming restores the order with the
generator's state. Under torchrun every process reads only its contiguous share of each global batch.

With no worker processes the batches are still read ahead: one thread of this process reads the next batches while
the current one trains. Reading a file waits on the disk with the interpreter lock released, and costs little CPU,
so it overlaps with the math instead of adding to it (a worker process would compete with the training threads
for the cores).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from elbox.core.errors import ElboxError
from elbox.data.inputs import ExampleRows

Images = Tensor | Dataset


def num_examples(data: Images) -> int:
    return data.shape[0] if isinstance(data, Tensor) else len(data)


def share(rows: int, rank: int, world: int) -> tuple[int, int]:
    """(start, stop) of process `rank`'s contiguous share of `rows` rows (as torch.tensor_split splits them)."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather(data: Images, batches: list[Tensor], device: torch.device, workers: int) -> Iterator[Tensor]:
    """The examples of each index batch, on the device, in order: index gathers in memory, or a DataLoader
    reading the files with `workers` processes (0: in this process)."""
    if isinstance(data, Tensor):
        data = data.to(device)
        return (data[idx.to(device)] for idx in batches)
    if isinstance(data, ExampleRows):  # rows of examples in memory: gathered on the device, no DataLoader
        examples, rows = data.examples.to(device), data.indices.to(device)
        return (examples[rows[idx.to(device)]] for idx in batches)
    # its own generator: a DataLoader draws its workers' base seed, which must not consume the global random
    # stream that the model's sampling uses (the run would then differ from the same images in memory)
    loader = DataLoader(
        data,
        batch_sampler=[idx.tolist() for idx in batches],
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=stack_examples,
        generator=torch.Generator().manual_seed(0),
    )
    return (images.to(device, non_blocking=True) for images in (read_ahead(loader) if workers == 0 else loader))


def read_ahead(batches: Iterable[Tensor], depth: int = 2) -> Iterator[Tensor]:
    """The items of `batches`, produced by a background thread that stays up to `depth` items ahead. An error in
    the thread is raised here; closing this generator early stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple) -> bool:
        """Put `entry` in the queue unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as error:  # handed to the consumer, raised there
            offer((done, error))

    thread = threading.Thread(target=produce, name="elbox-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def stack_examples(items: list) -> Tensor:
    """A batch from a Dataset's items (an example, or an (example, label) pair): uint8 images or float vectors."""
    examples = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
    if not all(isinstance(x, Tensor) and x.dtype in (torch.uint8, torch.float32, torch.float64) for x in examples):
        raise ElboxError(
            "a training Dataset must give uint8 image tensors [C, H, W] or float vectors [D] "
            "(or (example, label) pairs)"
        )
    return torch.stack(examples)


def validation_chunks(
    data: Images, batch_size: int, rank: int, world: int, device: torch.device, workers: int
) -> Iterator[tuple[int, Tensor]]:
    """(first row, examples) of this process's share of the validation data, in chunks of batch_size."""
    start, stop = share(num_examples(data), rank, world)
    firsts = range(start, stop, batch_size)
    batches = [torch.arange(first, min(first + batch_size, stop)) for first in firsts]
    return zip(firsts, gather(data, batches, device, workers))
