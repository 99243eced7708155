"""What a run does to raw input before its model sees it, so that new input is read the way the training data were.

A run's config.json "data" record holds it (written at training, read by `Preprocessing.from_record`):
    space, scaling      the data space: binarization, dequantization, or the standardization fitted on the training
                        vectors (elbox.data.spaces)
    image_size          a folder's images resized and center-cropped to (H, W)
    column_names        a table's columns, by name, in the model's order (taken by name from any table that has them,
                        like scikit-learn's feature names; missing ones are refused)
A trained or loaded model carries it as `model.preprocessing`, so `elbox.score(model, "new.csv")` standardizes,
picks columns and resizes as its run did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from elbox.core.errors import ElboxError
from elbox.data.spaces import DataSpace, get_data_space, space_from_record, space_record
from elbox.data.user import open_source
from elbox.data.user_images import parse_image_size
from elbox.data.user_tables import TABLE_SUFFIXES


@dataclass(frozen=True)
class Preprocessing:
    space: DataSpace
    image_size: tuple[int, int] | None = None
    column_names: tuple[str, ...] | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Preprocessing:
        """From a run's "data" record (checked by elbox.io.checkpoint.check_data_record). An older run that recorded
        only the columns it was given (--columns) takes those."""
        names = record.get("column_names") or record.get("columns")
        return cls(
            space_from_record(record), parse_image_size(record.get("image_size")), tuple(names) if names else None
        )

    def to_record(self) -> dict[str, Any]:
        """The entries of a "data" record that rebuild it."""
        record: dict[str, Any] = space_record(self.space)
        if self.image_size is not None:
            record["image_size"] = list(self.image_size)
        if self.column_names is not None:
            record["column_names"] = list(self.column_names)
        return record

    def open(self, path: str | os.PathLike, id_column: str | None = None) -> Dataset:
        """The data at `path` read as the run read its own: a folder's images at the run's size, a table's columns
        picked by name (id_column: a table column whose values name the rows)."""
        table = str(path).lower().endswith(TABLE_SUFFIXES)
        return open_source(
            path,
            image_size=self.image_size if not table else None,
            columns=list(self.column_names) if table and self.column_names else None,
            id_column=id_column,
        )


def input_space(model: Any, space: DataSpace | None = None) -> DataSpace:
    """The data space to read a model's input in: `space` if given, else its run's (model.preprocessing), else the
    model's own (a model of vectors has none without its run's standardization)."""
    if space is not None:
        return space
    if model.preprocessing is not None:
        return model.preprocessing.space
    if model.data_space == "real":
        raise ElboxError(
            f"this {model.name} model of vectors carries no standardization: give a run's model "
            "(elbox.load(run_dir), run.model, or the run itself), or space="
        )
    return get_data_space(model.data_space)


def open_input(model: Any, path: str | os.PathLike, id_column: str | None = None) -> Dataset:
    """The data at `path` read as the model's run read its data (model.preprocessing), or as they are."""
    if model.preprocessing is not None:
        return model.preprocessing.open(path, id_column)
    return open_source(path, id_column=id_column)
