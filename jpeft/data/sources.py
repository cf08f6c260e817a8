"""Rows from local files (JSONL, JSON, CSV, parquet, `save_to_disk` dirs), checked with clear errors.

Everything is read locally with no hub access. Row numbers in errors are 1-based and equal the
line number of a JSONL file (blank lines are rejected, except at the end, so this holds).
"""
import json
import os

import datasets
import pyarrow
import pyarrow.parquet

from jpeft.errors import DataError

_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def load_rows(path: str) -> datasets.Dataset:
    """One split of rows. A `DatasetDict` dir is refused: pass `dir/<split>` to say which split."""
    if not os.path.exists(path):
        raise DataError(f"data file '{path}' not found; check data.train / data.eval")
    if os.path.isdir(path):
        return _load_dir(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".jsonl", ".json"):
        ds = _from_rows(_read_json(path), path)
    elif suffix == ".csv":
        ds = _read_csv(path)
    elif suffix == ".parquet":
        ds = _read_parquet(path)
    else:
        raise DataError(f"data file '{path}' has an unsupported type; use one of "
                        f"{', '.join(_SUFFIXES)} or a datasets.save_to_disk directory")
    if len(ds) == 0:
        raise DataError(f"data file '{path}' has no rows")
    return ds


def check_columns(ds: datasets.Dataset, path: str, columns) -> None:
    """Every row must hold a string in every needed column, so templates never render 'None'."""
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"data file '{path}' row 1 has no column '{column}'; "
                            f"columns are: {', '.join(ds.column_names)}")
        values = ds.select_columns([column]).to_dict()[column]
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            v = values[bad[0]]
            what = "is missing (null)" if v is None else f"is {type(v).__name__} {v!r}, not a string"
            more = f" ({len(bad) - 1} more rows like it)" if len(bad) > 1 else ""
            raise DataError(f"data file '{path}' row {bad[0] + 1}: column '{column}' {what}"
                            f"{more}; fix the data or choose other columns in the templates")


def usable_rows(ds: datasets.Dataset, path: str, columns, strict: bool = False) -> tuple[datasets.Dataset, dict]:
    """The rows holding a string in every needed column, and the count of the others by reason.

    A column no row has is always an error (the config names the wrong column); a row whose value is
    missing or not a string is dropped and counted, or with `strict` (data.strict) an error naming it.
    """
    if strict:
        check_columns(ds, path, columns)
        return ds, {}
    check_columns(ds.select(range(0)), path, columns)  # the columns exist
    table = ds.select_columns(list(columns)).to_dict()
    dropped, keep = {}, []
    for i in range(len(ds)):
        bad = next((c for c in columns if not isinstance(table[c][i], str)), None)
        if bad is None:
            keep.append(i)
        else:
            reason = f"column '{bad}' " + ("missing (null)" if table[bad][i] is None else "not a string")
            dropped[reason] = dropped.get(reason, 0) + 1
    if not keep:
        raise DataError(f"data file '{path}': no row has a string in every needed column ({', '.join(columns)}); "
                        f"dropped: {dropped}")
    return (ds if len(keep) == len(ds) else ds.select(keep)), dropped


def _load_dir(path: str) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(f"directory '{path}' is not a dataset saved with "
                        "datasets.save_to_disk; pass a data file or such a directory") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(os.path.join(path, name) for name in ds)
        raise DataError(f"'{path}' holds several splits; pass one of them: {splits}")
    return ds


def _read_json(path: str) -> list[dict]:
    """JSONL line by line (a `.json` file holding one array is also accepted)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"data file '{path}' line {e.lineno}: invalid JSON ({e.msg})") from None
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"data file '{path}' item {i}: expected a JSON object, "
                                f"got {type(row).__name__}")
        return rows
    lines = text.rstrip().split("\n") if text.strip() else []
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError(f"data file '{path}' line {number} is blank; JSONL needs one "
                            "JSON object per line, remove the blank line")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data file '{path}' line {number}: invalid JSON ({e.msg} at "
                            f"column {e.colno}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"data file '{path}' line {number}: expected a JSON object "
                            f"{{...}}, got {type(row).__name__}")
        rows.append(row)
    return rows


def _from_rows(rows: list[dict], path: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(rows)
    except (pyarrow.ArrowException, TypeError, ValueError):
        raise DataError(_type_clash(rows, path)) from None


def _type_clash(rows: list[dict], path: str) -> str:
    """Name the first row whose value type differs from earlier rows in the same column."""
    seen: dict[str, type] = {}
    for number, row in enumerate(rows, 1):
        for column, value in row.items():
            if value is None:
                continue
            first = seen.setdefault(column, type(value))
            if type(value) is not first:
                return (f"data file '{path}' row {number}: column '{column}' is "
                        f"{type(value).__name__} {value!r} but earlier rows hold "
                        f"{first.__name__}; make the column one type")
    return f"data file '{path}': rows cannot form one table (mixed value types)"


def _read_csv(path: str) -> datasets.Dataset:
    """Every cell as its exact text, so text columns stay strings ('NA' and 'null' too); an empty cell, or one a
    short row lacks, is missing (null): CSV has no other way to say so, and a silently empty target would train."""
    import pandas

    try:
        frame = pandas.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pandas.errors.ParserError, pandas.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"data file '{path}' is not valid CSV: {e}") from None
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _read_parquet(path: str) -> datasets.Dataset:
    try:
        return datasets.Dataset(pyarrow.parquet.read_table(path))
    except pyarrow.ArrowException as e:
        raise DataError(f"data file '{path}' is not valid parquet: {e}") from None
