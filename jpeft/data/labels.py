"""Class labels of a data column -> class ids, the same way for training and evaluation.

String labels name classes: a training file's sorted distinct values, in that order, are the
class ids 0, 1, ... (deterministic whatever the row order). Integer labels are class ids as they
are, named HF's default way (`LABEL_0`, ...). A CSV file holds strings only, so its "0"/"1"
labels are names too (sorted as text).
"""
import numpy as np

from jpeft.errors import DataError


def default_names(count: int) -> list[str]:
    return [f"LABEL_{i}" for i in range(count)]


def label_names(rows, column: str, path: str, num_labels: int | None = None) -> list[str]:
    """The class names, in id order, that a training file's label column implies (`num_labels`
    classes when given: more than the data holds get default names)."""
    values = _column(rows, column, path)
    if isinstance(values[0], str):
        names = sorted(set(values))
    else:
        names = default_names(max(values) + 1)
    if num_labels is not None and num_labels < len(names):
        raise DataError(f"data file '{path}': column '{column}' holds {len(names)} classes but method.num_labels="
                        f"{num_labels}; raise it, or leave it unset to take the data's")
    return names + default_names(num_labels or 0)[len(names):]


def label_ids(rows, column: str, path: str, names: list[str]) -> np.ndarray:
    """Each row's class id: a string label through `names`, an integer one as it is."""
    ids = []
    for i, value in enumerate(_column(rows, column, path)):
        if isinstance(value, str) and value not in names:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise DataError(f"data file '{path}' row {i + 1}: label {value!r} is not one of the classifier's "
                            f"{len(names)} classes ({shown})")
        if isinstance(value, int) and not 0 <= value < len(names):
            raise DataError(f"data file '{path}' row {i + 1}: label {value} is not a class id of the classifier "
                            f"(0 to {len(names) - 1})")
        ids.append(names.index(value) if isinstance(value, str) else value)
    return np.asarray(ids, np.int32)


def _column(rows, column: str, path: str) -> list:
    """The label column's values, each a string or a non-negative integer, all of one kind."""
    if column not in rows.column_names:
        raise DataError(f"data file '{path}' has no label column '{column}' (data.label); columns are: "
                        f"{', '.join(rows.column_names)}")
    values = rows.select_columns([column]).to_dict()[column]
    kind = str if isinstance(values[0], str) else int
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
            first = "a class name (a string)" if kind is str else "a class id (an integer >= 0)"
            raise DataError(f"data file '{path}' row {i + 1}: label {value!r} in column '{column}' is not {first} "
                            f"as row 1's is; labels are class names (strings) or class ids (integers >= 0, not "
                            "booleans or floats), one kind per file")
    return values
