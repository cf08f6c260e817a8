"""Rows from local files (JSONL, JSON, CSV, parquet, `save_to_disk` dirs), checked with clear errors.

Everything is read locally with no hub access. Row numbers in errors are 1-based and equal the
line number of a JSONL file (blank lines are rejected, except at the end, so this holds).
"""
import collections
import json
import logging
import os
import string

import datasets
import pyarrow
import pyarrow.parquet

from jpeft.data.tokenize import column
from jpeft.errors import DataError

_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
log = logging.getLogger("jpeft.data")


def load_rows(path: str, given_by: str = "data.train / data.eval") -> datasets.Dataset:
    """One split of rows. A `DatasetDict` dir is refused: pass `dir/<split>` to say which split. `given_by`: the
    key or flag a missing file is blamed on."""
    if not os.path.exists(path):
        raise DataError(f"data file '{path}' not found; check {given_by}")
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


def check_columns(ds: datasets.Dataset, path: str, fields) -> None:
    """Every row must hold a string in every needed template field (a column, or a value inside one:
    `translation[en]`), so templates never render 'None'."""
    problems = _problems(ds, path, fields)
    for i, problem in enumerate(problems):
        if problem:
            field, value = problem
            what = "is missing (null)" if value is None else f"is {type(value).__name__} {value!r}, not a string"
            more = sum(p is not None and p[0] == field for p in problems[i + 1:])
            raise DataError(f"data file '{path}' row {i + 1}: {_named(field)} {what}"
                            f"{f' ({more} more rows like it)' if more else ''}; fix the data or choose other "
                            "columns in the templates")


def usable_rows(ds: datasets.Dataset, path: str, fields, strict: bool = False) -> tuple[datasets.Dataset, dict]:
    """The rows holding a string in every needed template field, and the count of the others by reason.

    A column no row has is always an error (the config names the wrong column); a row whose value is
    missing or not a string is dropped and counted, or with `strict` (data.strict) an error naming it.
    """
    if strict:
        check_columns(ds, path, fields)
        return ds, {}
    problems = _problems(ds, path, fields)
    dropped, keep = {}, []
    for i, problem in enumerate(problems):
        if problem is None:
            keep.append(i)
        else:
            reason = f"{_named(problem[0])} {'missing (null)' if problem[1] is None else 'not a string'}"
            dropped[reason] = dropped.get(reason, 0) + 1
    if not keep:
        raise DataError(f"data file '{path}': no row has a string in every needed column ({', '.join(fields)}); "
                        f"dropped: {dropped}")
    return (ds if len(keep) == len(ds) else ds.select(keep)), dropped


def _problems(ds: datasets.Dataset, path: str, fields) -> list[tuple[str, object] | None]:
    """Per row: (the first needed field without a string, the value there: None where missing), or None.
    A column no row has is an error."""
    columns = list(dict.fromkeys(map(column, fields)))
    if not columns:  # (chat rows: their messages are checked by jpeft.data.chat)
        return [None] * len(ds)
    for name in columns:
        if name not in ds.column_names:
            raise DataError(f"data file '{path}' row 1 has no column '{name}'; "
                            f"columns are: {', '.join(ds.column_names)}")
    table = ds.select_columns(columns).to_dict()
    return [next(((f, v) for f in fields if not isinstance(v := _value(row, f), str)), None)
            for row in ({name: table[name][i] for name in columns} for i in range(len(ds)))]


def _value(row: dict, field: str):
    """A template field's value in a row, or None where the row has none (a key or index it lacks)."""
    try:
        return string.Formatter().get_field(field, (), row)[0]
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def _named(field: str) -> str:
    return f"column '{field}'" if field == column(field) else f"field '{field}'"


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
    """The rows as one table of every column any row has (a row without one holds null there, as
    `datasets.load_dataset("json")` reads it). Where one Arrow type cannot hold a column's values, those that
    do not fit its most common type are read as missing (with a warning naming their rows), so only rows that
    need them are dropped."""
    columns = {name: [row.get(name) for row in rows] for name in dict.fromkeys(k for row in rows for k in row)}
    for name, values in columns.items():
        if _typed(values):
            continue
        types = [_arrow_type(v) for v in values]  # once per value
        common = collections.Counter(str(t) for t in types if t is not None).most_common(1)[0][0]
        anchor = next(v for v, t in zip(values, types) if str(t) == common)
        fitting = [v if v is not None and _typed([anchor, v]) else None for v in values]
        columns[name] = fitting if _typed(fitting) else [None] * len(values)
        odd = [i + 1 for i, (v, f) in enumerate(zip(values, columns[name])) if v is not None and f is None]
        log.warning("data file '%s': column '%s' mixes value types; %d values that do not fit its common type are "
                    "read as missing (rows %s%s)", path, name, len(odd), ", ".join(map(str, odd[:5])),
                    " ..." if len(odd) > 5 else "")
    return datasets.Dataset.from_dict(columns)


def _typed(values: list) -> bool:
    """Can one Arrow type hold these values?"""
    try:
        pyarrow.array(values)
        return True
    except (pyarrow.ArrowException, TypeError, ValueError):
        return False


def _arrow_type(value):
    """The Arrow type of one value, or None (null, or a value Arrow cannot hold)."""
    try:
        return None if value is None else pyarrow.array([value]).type
    except (pyarrow.ArrowException, TypeError, ValueError):
        return None


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
