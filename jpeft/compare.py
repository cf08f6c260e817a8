"""`jpeft compare RUN_DIR...`: finished runs side by side, in one table as a PEFT paper has it.

Each run's `summary.json` (written by `jpeft train` when the run finishes) is a row: trainable
parameters (count and share of the total), held-out NLL first, then the generation metrics the
run has (ROUGE/BLEU, or accuracy/macro-F1 for a classification run), the change against a
baseline row, forgetting figures (`eval.forgetting` probes), train time and peak memory. A
column is shown when some row has its value, so a table of summarization runs, of
classification runs, or of both, needs no options.
"""
from __future__ import annotations

import json
import os

from jpeft.errors import ConfigError, read_json
from jpeft.forgetting import FORMATS, KEY_PREFIX

COLUMNS = (  # row key, header, format spec of its value
    ("trainable_params", "trainable", ",d"),
    ("trainable_pct", "% of total", ".3g"),
    ("eval_loss", "NLL", ".3f"),
    ("eval_loss_all_tasks", "NLL, all tasks", ".3f"),
    ("eval_rouge1", "ROUGE-1", ".4f"),
    ("eval_rouge2", "ROUGE-2", ".4f"),
    ("eval_rougeL", "ROUGE-L", ".4f"),
    ("eval_bleu", "BLEU", ".2f"),
    ("eval_accuracy", "accuracy", ".4f"),
    ("eval_macro_f1", "macro-F1", ".4f"),
    ("delta_eval_loss", "Δ NLL", "+.3f"),
    ("delta_eval_rougeL", "Δ ROUGE-L", "+.4f"),
    ("delta_eval_accuracy", "Δ accuracy", "+.4f"),
    ("train_seconds", "train s", ".1f"),
    ("peak_rss_mib", "peak RSS MiB", ",.0f"),
)
HEADERS = {key: header for key, header, _ in COLUMNS}
# The metrics a reader compares first: each gets a change-vs-baseline column and a bar chart.
HEADLINE = {"eval_loss": "lower", "eval_rougeL": "higher", "eval_accuracy": "higher"}  # which way is better


def tasks(row: dict) -> list[str]:
    """The tasks of a mixture run with held-out metrics of their own (`eval_<task>_loss`, trainer.evaluation)."""
    return [k[len("eval_"):-len("_loss")] for k in row if k.startswith("eval_") and k.endswith("_loss")
            and k != "eval_loss"]


def all_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """COLUMNS with, after the held-out metrics, one per metric of each mixture task some row has
    (`<task> NLL`, `<task> ROUGE-L`, ...); and before the time and memory columns, one per forgetting
    figure (jpeft.forgetting.record's keys): each probe's score and its change relative to the base (the
    base's own score is what that change is relative to, so it gets no column)."""
    metrics = [column for column in COLUMNS if column[0].startswith("eval_") and column[0] != "eval_loss_all_tasks"]
    per_task = [(f"eval_{task}_{key[len('eval_'):]}", f"{task} {header}", spec)
                for task in dict.fromkeys(t for row in rows for t in tasks(row)) for key, header, spec in metrics]
    keys = dict.fromkeys(k for row in rows for k in row if k.startswith(KEY_PREFIX) and not k.endswith("_base"))
    forgetting = [(k, k[len(KEY_PREFIX):].replace("_", " "), FORMATS.get(k.rsplit("_", 1)[1], ".4g")) for k in keys]
    deltas, at = ([key for key, _, _ in COLUMNS].index(k) for k in ("delta_eval_loss", "train_seconds"))
    return [*COLUMNS[:deltas], *per_task, *COLUMNS[deltas:at], *forgetting, *COLUMNS[at:]]


def read_run(run_dir: str) -> dict:
    """A run dir's summary.json as a row (named by the dir), or an error saying the run is not done."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: not a finished jpeft run (no summary.json; `jpeft train` writes it when "
                          "the run completes)")
    summary = read_json(path, ConfigError, "a finished jpeft run has one")
    return {"name": os.path.basename(os.path.abspath(run_dir)), "run_dir": os.path.normpath(run_dir), **summary}


def read_runs(run_dirs: list[str]) -> list[dict]:
    """The rows of several run dirs, named by their dir names (by their paths where two dir names clash)."""
    rows = [read_run(d) for d in run_dirs]
    if len({r["name"] for r in rows}) < len(rows):
        rows = [{**r, "name": r["run_dir"]} for r in rows]
    return rows


def comparison(rows: list[dict], baseline: str | None = None) -> dict:
    """The table as data: each row with its share of parameters, peak memory in MiB and (given a
    baseline row, by name or run dir) its headline metrics minus the baseline's; and the columns
    some row fills, in display order."""
    base = find_row(rows, baseline) if baseline is not None else None
    table = []
    for row in rows:
        row = dict(row)
        if "trainable_params" in row and row.get("total_params"):
            row["trainable_pct"] = 100 * row["trainable_params"] / row["total_params"]
        if "peak_rss_bytes" in row:
            row["peak_rss_mib"] = row.pop("peak_rss_bytes") / 2 ** 20
        if tasks(row) and "eval_loss" in row:  # a mixture's loss over all its tasks' tokens is no task's NLL
            row["eval_loss_all_tasks"] = row.pop("eval_loss")
        if base is not None:
            row.update({f"delta_{k}": row[k] - base[k] for k in HEADLINE if k in row and k in base})
        table.append(row)
    columns = [key for key, _, _ in all_columns(table) if any(key in row for row in table)]
    return {"baseline": None if base is None else base["name"], "columns": columns, "rows": table}


def find_row(rows: list[dict], wanted: str) -> dict:
    """The row a baseline names, by its name, its run dir (as a user would type either) or, where names are
    paths because two dirs share a name, a dir name only one of them has."""
    for row in rows:
        if wanted == row["name"] or os.path.normpath(wanted) == row.get("run_dir"):
            return row
    named = [row for row in rows if os.path.basename(row.get("run_dir", "")) == wanted]
    if len(named) == 1:
        return named[0]
    raise ConfigError(f"baseline {wanted!r} is none of the compared runs ({', '.join(r['name'] for r in rows)}); "
                      "name one by its run dir or its name")


def label(row: dict) -> str:
    """The row's name, with its method when the name does not say it (a dir named lora_r4 runs lora)."""
    method = row.get("method")
    return row["name"] if method in (None, row["name"]) else f"{row['name']} ({method})"


def format_markdown(table: dict) -> str:
    """The table as markdown (padded, so it also reads in a terminal), with a line saying what NLL and Δ are."""
    shown = [(key, header, spec) for key, header, spec in all_columns(table["rows"]) if key in table["columns"]]
    cells = [["method", *(header for _, header, _ in shown)]]
    cells += [[label(row), *("-" if row.get(k) is None else format(row[k], spec) for k, _, spec in shown)]
              for row in table["rows"]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]

    def line(values):
        return "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    note = "NLL: teacher-forced nats/token of the held-out targets (lower is better)"
    if "eval_loss_all_tasks" in table["columns"]:
        note += "; NLL, all tasks: a mixture's, over all its tasks' held-out tokens"
    if table["baseline"] is not None:
        note += f"; Δ: minus {table['baseline']}"
    if any(key.startswith(KEY_PREFIX) for key in table["columns"]):
        note += "; change: a forgetting probe's (fine-tuned - base) / base"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:]), "", note + "."])


def plot_comparison(table: dict, path: str) -> str | None:
    """A bar chart per headline metric present (held-out NLL, ROUGE-L, accuracy), one bar per row
    that has it; None (and no file) when no row has any."""
    panels = [key for key in HEADLINE if key in table["columns"]]
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 1.5 + 0.4 * len(table["rows"])),
                             squeeze=False)
    for ax, key in zip(axes[0], panels):
        rows = [row for row in table["rows"] if key in row]
        bars = ax.barh([label(row) for row in rows], [row[key] for row in rows], color="tab:blue")
        ax.bar_label(bars, fmt="%.3f", padding=2)
        ax.invert_yaxis()  # rows top to bottom, as in the table
        ax.set_title(f"held-out {HEADERS[key]} ({HEADLINE[key]} is better)")
        ax.margins(x=0.2)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison(table: dict, out_dir: str) -> list[str]:
    """comparison.md, comparison.json and (when there is a metric to chart) comparison.png; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "comparison.md"), os.path.join(out_dir, "comparison.json")]
    with open(paths[0], "w") as f:
        f.write(format_markdown(table) + "\n")
    with open(paths[1], "w") as f:
        json.dump(table, f, indent=2)
    png = plot_comparison(table, os.path.join(out_dir, "comparison.png"))
    return paths + ([png] if png else [])


def compare(run_dirs: list[str], out_dir: str = ".", baseline: str | None = None) -> dict:
    """Read the runs, tabulate them, write the files; the table as data."""
    table = comparison(read_runs(run_dirs), baseline)
    write_comparison(table, out_dir)
    return table
