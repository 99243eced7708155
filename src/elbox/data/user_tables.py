"""Users' tables (CSV, TSV, Parquet) as torch Datasets of float32 vectors, read with pyarrow.

A table is loaded whole into memory (as float64 [N, D]); Parquet reads only the chosen columns. pyarrow is
imported when a table is first opened, so that commands that read no table do not pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from elbox.core.errors import ElboxError
from elbox.core.extras import require
from elbox.core.options import short_repr
from elbox.data.formats import first_true
from elbox.data.user_images import cut, item_index, one_line

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")  # compression is recognized by pyarrow from the name
TABLE_SUFFIXES = CSV_SUFFIXES + PARQUET_SUFFIXES
_FLOAT32_MAX = float(np.finfo(np.float32).max)
CSV_BLOCK = 1 << 20  # bytes pyarrow parses at a time (its default): the longest line a CSV may have


def _picked(names: list[str], columns: Any, what: str) -> list[int]:
    """Indices of the chosen columns in the table's order of `columns` (all columns when None)."""
    if columns is None:
        columns = names
    elif isinstance(columns, str):
        columns = [columns]
    elif not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) for c in columns) or not columns:
        raise ElboxError(f"columns must be a non-empty list of column names, got {short_repr(columns)}")
    missing = [c for c in columns if c not in names]
    if missing:
        raise ElboxError(f"{what} has no column {short_repr(missing[0])}; its columns are {short_repr(names, 200)}")
    twice = sorted({c for c in columns if names.count(c) > 1 or list(columns).count(c) > 1})
    if twice:
        raise ElboxError(
            f"{what}: column name {short_repr(twice[0])} is not unique; give each column once, under a name used once"
        )
    return [names.index(c) for c in columns]


def _example(column: Any) -> str:
    """`, e.g. 'abc'`: the first non-empty value of a non-numeric column, or nothing."""
    values = column.drop_null()
    return f", e.g. {short_repr(values[0].as_py(), 30)}" if len(values) else ", all cells empty"


class Table(Dataset):
    """The numeric columns of a CSV (comma-separated; .tsv tab-separated; optionally gzipped) or Parquet file:
    item i is row i as a float64 tensor [D] (elbox.data.spaces standardizes in float64, then the model sees float32).
    The CSV's first line names the columns.

    `columns` picks columns by name, in that order (a name not in the table is an error that lists those there);
    without it every column is taken. A non-numeric column among those taken is an error naming it; integer,
    floating-point and decimal columns are numeric. Empty cells (and the CSV markers of missing values: NA, NaN,
    null, ...), infinite values and values too large for float32 are refused by row (counted from 0, the header not
    counted) and column. The table is loaded whole into memory.

    `id_column` names a column whose values name the rows (row_names; not modelled, any type; empty cells name
    a row "None").

    Attributes: path, array (float64 [N, D]), names and columns (the column names), row_names (or None), shape (D,),
    kind "vectors".
    """

    kind = "vectors"

    def __init__(self, path: str | os.PathLike, columns: list[str] | None = None, id_column: str | None = None):
        require("pyarrow", "reading a table (.csv, .tsv, .parquet)")
        import pyarrow
        import pyarrow.csv
        import pyarrow.parquet

        self.path = Path(path)
        what = f"table {self.path}"
        if not self.path.is_file():
            raise ElboxError(f"{what} " + ("is not a file" if self.path.exists() else "does not exist"))
        parquet = self.path.name.lower().endswith(PARQUET_SUFFIXES)
        try:
            if parquet:
                schema, table = pyarrow.parquet.read_schema(self.path), None
            else:
                delimiter = "\t" if self.path.name.lower().endswith((".tsv", ".tsv.gz")) else ","
                # an ID column is read as text: "00042" stays "00042"
                types = {id_column: pyarrow.string()} if id_column is not None else {}
                table = pyarrow.csv.read_csv(
                    self.path,
                    pyarrow.csv.ReadOptions(block_size=CSV_BLOCK),
                    pyarrow.csv.ParseOptions(delimiter=delimiter),
                    pyarrow.csv.ConvertOptions(column_types=types),
                )
                schema = table.schema
            if table is not None and table.num_rows == 0:
                raise ElboxError(f"{what} has no rows")
            names = list(schema.names)
            if id_column is not None:
                (id_index,) = _picked(names, [id_column], what)
                if columns is not None and id_column in columns:
                    raise ElboxError(f"{what}: the ID column {id_column!r} names the rows; it cannot also be modelled")
            picked = _picked(names, [n for n in names if n != id_column] if columns is None else columns, what)
            bad = [i for i in picked if not _is_numeric(schema.field(i).type, pyarrow)]
            if bad:
                examples = [_example(table.column(i)) if table is not None else "" for i in bad]
                described = ", ".join(
                    f"{names[i]!r} ({schema.field(i).type}{e})" for i, e in zip(bad, examples, strict=True)
                )
                raise ElboxError(
                    f"{what} has non-numeric columns: {cut(described, 160)}; pick numeric "
                    "columns when training (--columns, columns= in Python)"
                )
            if parquet:
                table = pyarrow.parquet.read_table(
                    self.path, columns=[names[i] for i in picked] + ([id_column] if id_column is not None else [])
                )
                ids = table.column(id_column) if id_column is not None else None
                table = table.select(list(range(len(picked))))
            else:
                ids = table.column(id_index) if id_column is not None else None
                table = table.select(picked)
        except ElboxError:
            raise
        except (pyarrow.ArrowException, OSError, ValueError, EOFError) as e:
            if not parquet and "block" in str(e) and self.path.stat().st_size > CSV_BLOCK:  # a line must fit in a block
                raise ElboxError(f"{what} has a line longer than {CSV_BLOCK >> 20} MB, the longest read") from None
            raise ElboxError(
                f"{what} is not a readable {'Parquet' if parquet else 'CSV'} file: {one_line(e)}"
            ) from None
        self.names = self.columns = [names[i] for i in picked]
        self.shape = (len(picked),)
        if table.num_rows == 0:
            raise ElboxError(f"{what} has no rows")
        self.array = self._to_array(table, what, pyarrow)
        self.row_names = None if ids is None else [str(v) for v in ids.to_pylist()]

    def _to_array(self, table: Any, what: str, pyarrow: Any) -> np.ndarray:
        values = np.empty((table.num_rows, table.num_columns), np.float64)
        bad = np.zeros(values.shape, bool)
        for j, column in enumerate(table.columns):
            values[:, j] = column.cast(pyarrow.float64(), safe=False).to_numpy()
            bad[:, j] = column.is_null().to_numpy()
        for problem, mask in (
            ("an empty cell or missing value", bad),
            ("a NaN or infinite value", ~np.isfinite(values) & ~bad),
            ("a value too large for float32", np.abs(np.nan_to_num(values)) > _FLOAT32_MAX),
        ):
            if mask.any():
                (row, col), _ = first_true(mask, 0)
                raise ElboxError(f"{what} has {problem} at row {row}, column {self.names[col]!r}; give finite numbers")
        return values  # float64: standardized before any cast (a column's spread may be tiny next to its values)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.array[item_index(index, len(self))].copy())

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """A batch's rows at once (DataLoader asks for them so, instead of one __getitem__ each)."""
        return list(torch.from_numpy(self.array[np.asarray(indices, dtype=np.int64).reshape(-1)]).unbind(0))


def _is_numeric(kind: Any, pyarrow: Any) -> bool:
    return pyarrow.types.is_integer(kind) or pyarrow.types.is_floating(kind) or pyarrow.types.is_decimal(kind)
