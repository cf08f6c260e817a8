"""A run's tasks: where each one's rows come from, and how several mix into one stream of batches.

A run has one task, `data.*` itself, or the entries of `data.mixture`: each entry sets the
data.* keys of its own task (train, eval, template or prompt + target or text, columns, split,
...; the run's data.* keys fill in the rest) plus a `name`, a `weight` and a `cap`. Weights are
shares of the training examples; without weights every task gets FLAN's examples-proportional
share: its number of examples, capped at `cap`, so a huge task cannot drown the others.

`data.split` cuts one file into train / eval / test by ratios (a seeded permutation of its
rows) or picks named splits of a `datasets.save_to_disk` directory; the row ids of each part
are written to the run's `split.json`, so evaluation never sees a training row.

Batches of a mixture are a pure function of (seed, step), as single-task batches are: each
slot of a step's batch draws a task by its rate, then the next row of that task's own seeded
order, epoch after epoch. A resumed run replays the draws to find where each task stood.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jpeft.data.sources import load_rows
from jpeft.errors import DataError

SPLITS = ("train", "eval", "test")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # "" for a run's only task: its metrics keep their plain names
    data: Any  # the task's DataSection
    weight: float | None = None
    cap: int | None = None


def run_tasks(data) -> list[Task]:
    """The tasks of a run's data section (typed mixture entries, see jpeft.config)."""
    if data.mixture is None:
        return [Task("", data)]
    own = ("name", "weight", "cap")
    return [Task(entry.get("name") or _stem(entry["train"]),
                 dataclasses.replace(data, mixture=None, **{k: v for k, v in entry.items() if k not in own}),
                 entry.get("weight"), entry.get("cap")) for entry in data.mixture]


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def check_split(split: dict, eval_path: str | None, fail) -> None:
    """`{train: 0.9, eval: 0.1}` ratios or `{train: train, eval: validation}` split names."""
    unknown = sorted(set(split) - set(SPLITS))
    if unknown or "train" not in split:
        fail("split", f"takes the parts {', '.join(SPLITS)} (train required), got {sorted(split)}")
    values = list(split.values())
    if all(isinstance(v, str) for v in values):
        pass
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in values):
        if sum(values) > 1 + 1e-9:
            fail("split", f"ratios add up to {sum(values):g}, more than 1")
    else:
        fail("split", f"must give every part a ratio in (0, 1] or every part a split name, got {split}")
    if eval_path is not None and "eval" in split:
        fail("split", f"has an eval part and data.eval={eval_path!r} is set too; keep one")


def split_rows(path: str, split: dict, seed: int) -> dict[str, tuple[Any, list[int]]]:
    """Each part of the split: (its rows, their ids in the source: row numbers, or a named split's own)."""
    if all(isinstance(v, str) for v in split.values()):
        parts = {}
        for part, name in split.items():
            where = os.path.join(path, name)
            if not os.path.isdir(where):
                raise DataError(f"data.split names split '{name}', which '{path}' does not hold; it needs a "
                                f"datasets.save_to_disk directory with {name}/ inside")
            rows = load_rows(where)
            parts[part] = (rows, list(range(len(rows))))
        return parts
    rows = load_rows(path)
    n = len(rows)
    order = np.random.default_rng(seed).permutation(n)
    parts, at = {}, 0
    for part, ratio in split.items():
        count = int(round(ratio * n))
        if count == 0:
            raise DataError(f"data.split gives '{part}' {ratio:g} of the {n} rows of '{path}': none; "
                            "raise the ratio or add rows")
        ids = sorted(int(i) for i in order[at:at + count])
        parts[part], at = (rows.select(ids), ids), at + count
    return parts


def task_rows(task: Task, part: str, seed: int) -> tuple[Any, str, list[int] | None] | None:
    """(rows, where they come from, their row ids under a split) of a task's train or eval part, or
    None where the task has no such part."""
    data = task.data
    if data.split is None:
        path = data.train if part == "train" else data.eval
        return None if path is None else (load_rows(path), path, None)
    if part not in data.split:
        return None
    rows, ids = split_rows(data.train, data.split, seed)[part]
    return rows, f"{data.train} ({part} split)", ids


def needed_fields(data) -> list[str]:
    """The template fields (columns, or values inside them) every usable row of a task must hold as strings."""
    from jpeft.data.tokenize import template_fields
    if data.label is not None:
        return template_fields(data.prompt if data.prompt is not None else "{" + data.text + "}")
    if data.text is not None:
        return [data.text]
    if data.template is not None:
        return template_set(data).fields()
    if data.prompt is None:  # chat rows: a messages column, checked by jpeft.data.chat
        return []
    return list(dict.fromkeys(template_fields(data.prompt) + [data.target]))


def phrasings(data, n: int, seed: int) -> tuple[Sequence[str] | str | None, Sequence[str] | str | None]:
    """(prompt templates, target templates) of n supervised rows: a template set's chosen phrasing per
    row, or data.prompt and data.target's column for every row; (None, None) for other rows."""
    if data.template is not None:
        ts = template_set(data)
        chosen = ts.choose(n, data.template_mode, seed)
        return [ts.phrasings[i][0] for i in chosen], [ts.phrasings[i][1] for i in chosen]
    if data.prompt is None or data.target is None:
        return None, None
    return data.prompt, "{" + data.target + "}"


def template_set(data):
    """The task's template set, reading the data's own column names."""
    from jpeft.data.templates import load_template_set
    return load_template_set(data.template).renamed(data.columns)


def mixing_rates(tasks: Sequence[Task], sizes: Sequence[int]) -> np.ndarray:
    """Each task's share of the training examples: its weight, else its size capped at `cap`."""
    shares = [t.weight if t.weight is not None else min(n, t.cap or n) for t, n in zip(tasks, sizes)]
    return np.asarray(shares, np.float64) / sum(shares)


def row_shares(rates, examples: Sequence[int], rows: Sequence[int]) -> np.ndarray:
    """Each task's share of the rows drawn so that its share of the examples is its rate: a row of a task
    whose `rows` hold `examples` between them (packed rows several; text windows several texts, and parts
    of others) stands for examples / rows of them."""
    draw = np.asarray(rates, np.float64) * np.asarray(rows, np.float64) / np.asarray(examples, np.float64)
    return draw / draw.sum()


def mixture_batches(examples, shares: np.ndarray, batch_size: int, seed: int, start_step: int = 0,
                    rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of a mixture's Examples (`task` numbers each row's task), each row of task t drawn
    with probability shares[t] (`row_shares`). `rows` picks this process's rows of each batch."""
    k = len(shares)
    members = [np.flatnonzero(examples.task == t) for t in range(k)]
    draw = np.asarray(shares, np.float64) / np.sum(shares)
    taken = np.zeros(k, np.int64)
    arrays, orders = examples.arrays(), {}

    def tasks_of(step: int) -> np.ndarray:
        return np.random.default_rng((seed, step)).choice(k, size=batch_size, p=draw)

    for step in range(start_step):  # where each task's order stood when the run stopped
        taken += np.bincount(tasks_of(step), minlength=k)
    step = start_step
    while True:
        index = np.empty(batch_size, np.int64)
        for slot, t in enumerate(tasks_of(step)):
            epoch, at = divmod(int(taken[t]), len(members[t]))
            if (t, epoch) not in orders:
                orders[t, epoch] = np.random.default_rng((seed, t, epoch)).permutation(members[t])
            index[slot] = orders[t, epoch][at]
            taken[t] += 1
        yield {name: a[index[rows]] for name, a in arrays.items()}
        step += 1
