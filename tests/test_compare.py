"""`jpeft compare`: run dirs (their summary.json, fabricated here) into one table, its files and errors."""
import json

import pytest

from jpeft.cli import main
from jpeft.compare import compare, comparison, format_markdown, read_runs
from jpeft.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
FULL = {"method": "full", "method_repr": "Full()", "trainable_params": 4000, "total_params": 4000,
        "train_seconds": 12.5, "peak_rss_bytes": 3 * 2 ** 30, "steps": 10, "eval_loss": 2.0,
        "eval_rouge1": 0.30, "eval_rouge2": 0.10, "eval_rougeL": 0.25, "eval_bleu": 9.0}
LORA = {**FULL, "method": "lora", "method_repr": "LoRA(rank=4)", "trainable_params": 200, "total_params": 4200,
        "train_seconds": 8.0, "peak_rss_bytes": 2 ** 30, "eval_loss": 2.3, "eval_rougeL": 0.2}
CLASSIFIER = {"method": "classifier", "trainable_params": 10, "total_params": 1000, "steps": 10, "eval_loss": 0.7,
              "eval_accuracy": 0.8, "eval_macro_f1": 0.75}


def write_runs(root, **summaries):
    for name, summary in summaries.items():
        (root / name).mkdir(parents=True)
        (root / name / "summary.json").write_text(json.dumps(summary))
    return [str(root / name) for name in summaries]


def test_shares_and_deltas_come_from_the_runs(tmp_path):
    table = compare(write_runs(tmp_path, full=FULL, lora=LORA), str(tmp_path / "out"), baseline="full")
    full, lora = table["rows"]
    assert lora["trainable_pct"] == pytest.approx(100 * 200 / 4200) and full["trainable_pct"] == 100
    assert lora["delta_eval_loss"] == pytest.approx(0.3) and lora["delta_eval_rougeL"] == pytest.approx(-0.05)
    assert full["delta_eval_loss"] == 0 and lora["peak_rss_mib"] == 1024
    assert table["baseline"] == "full" and "eval_accuracy" not in table["columns"]
    text = format_markdown(table)
    lora_line = next(line for line in text.splitlines() if line.startswith("| lora"))
    assert [c.strip() for c in lora_line.strip("|").split("|")] == [
        "lora", "200", "4.76", "2.300", "0.3000", "0.1000", "0.2000", "9.00", "+0.300", "-0.0500", "8.0", "1,024"]
    assert "Δ NLL" in text.splitlines()[0] and "minus full" in text


def test_without_a_baseline_there_are_no_delta_columns(tmp_path):
    table = comparison(read_runs(write_runs(tmp_path, full=FULL, lora=LORA)))
    assert not any(c.startswith("delta_") for c in table["columns"]) and table["baseline"] is None
    assert "Δ" not in format_markdown(table)


def test_classification_runs_show_accuracy_and_f1(tmp_path):
    table = comparison(read_runs(write_runs(tmp_path, head=CLASSIFIER, lora=LORA)), baseline="lora")
    header = format_markdown(table).splitlines()[0]
    assert "accuracy" in header and "macro-F1" in header and "ROUGE-L" in header  # a mixed table has both
    head, _ = table["rows"]
    assert head["eval_accuracy"] == 0.8 and "delta_eval_accuracy" not in head  # lora has no accuracy
    only = comparison(read_runs(write_runs(tmp_path / "cls", a=CLASSIFIER, b={**CLASSIFIER, "eval_accuracy": 0.9})),
                      baseline="a")
    assert "eval_rougeL" not in only["columns"] and only["rows"][1]["delta_eval_accuracy"] == pytest.approx(0.1)
    assert "head (classifier)" in format_markdown(table)  # a dir name that is not the method says the method


def test_forgetting_figures_get_a_column_each_before_time_and_memory(tmp_path):
    """A run trained with eval.forgetting: each probe's score and change, not its base (the change's reference)."""
    forgetting = {"forget_wiki_perplexity": 12.5, "forget_wiki_base": 10.0, "forget_wiki_change": 0.25,
                  "forget_qa_accuracy": 0.5, "forget_qa_base": 0.6}  # qa: no change where the base was 0
    table = comparison(read_runs(write_runs(tmp_path, full=FULL, lora={**LORA, **forgetting})))
    columns = table["columns"]
    assert columns[columns.index("train_seconds") - 3:columns.index("train_seconds")] == [
        "forget_wiki_perplexity", "forget_wiki_change", "forget_qa_accuracy"]
    assert "forget_wiki_base" not in columns and "forget_qa_base" not in columns
    header, _, full, lora = format_markdown(table).splitlines()[:4]
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    assert cells(header)[-5:-2] == ["wiki perplexity", "wiki change", "qa accuracy"]
    assert cells(lora)[-5:-2] == ["12.50", "+25.0%", "0.5000"] and cells(full)[-5:-2] == ["-", "-", "-"]
    assert "change: a forgetting probe's (fine-tuned - base) / base" in format_markdown(table)


def test_a_mixtures_tasks_get_columns_of_their_own_and_its_loss_over_all_tasks_is_no_nll(tmp_path):
    """A replay mixture's eval_loss mixes the summaries' NLL with the replay texts': it is shown apart, and
    each task's metrics under the task's name, so no row's NLL means another thing than the baseline's."""
    mixture = {**LORA, "eval_loss": 2.1, "eval_summarize_loss": 2.25, "eval_summarize_rougeL": 0.21,
               "eval_replay_loss": 1.9}
    del mixture["eval_rouge1"], mixture["eval_rouge2"], mixture["eval_rougeL"], mixture["eval_bleu"]
    table = comparison(read_runs(write_runs(tmp_path, lora=LORA, replay=mixture)), baseline="lora")
    lora, replay = table["rows"]
    assert "eval_loss" not in replay and replay["eval_loss_all_tasks"] == 2.1 and "delta_eval_loss" not in replay
    assert table["columns"].index("eval_loss_all_tasks") < table["columns"].index("eval_summarize_loss") \
        < table["columns"].index("eval_summarize_rougeL") < table["columns"].index("eval_replay_loss") \
        < table["columns"].index("delta_eval_loss")
    header = format_markdown(table).splitlines()[0]
    assert "NLL, all tasks" in header and "summarize NLL" in header and "replay NLL" in header
    assert "summarize ROUGE-L" in header and "replay ROUGE-L" not in header


def test_baseline_by_run_dir_and_clashing_dir_names(tmp_path):
    dirs = write_runs(tmp_path, **{"a/lora": LORA, "b/lora": FULL})
    table = comparison(read_runs(dirs), baseline=dirs[1] + "/")
    assert [r["name"] for r in table["rows"]] == dirs and table["rows"][0]["delta_eval_loss"] == pytest.approx(0.3)
    dirs = write_runs(tmp_path / "c", **{"a/lora": LORA, "b/lora": LORA, "b/full": FULL})
    table = comparison(read_runs(dirs), baseline="full")  # the one dir named full, though names are paths now
    assert table["baseline"] == dirs[2] and table["rows"][0]["delta_eval_loss"] == pytest.approx(0.3)


def test_errors_name_the_run_or_the_baseline(tmp_path):
    (tmp_path / "running").mkdir()
    with pytest.raises(ConfigError, match="running: not a finished jpeft run"):
        read_runs([str(tmp_path / "running")])
    dirs = write_runs(tmp_path, full=FULL, lora=LORA)
    with pytest.raises(ConfigError, match=r"baseline 'qlora' is none of the compared runs \(full, lora\)"):
        comparison(read_runs(dirs), baseline="qlora")


def test_cli_prints_markdown_or_json_and_writes_the_files(tmp_path, capsys):
    dirs = write_runs(tmp_path, full=FULL, lora=LORA)
    out = tmp_path / "out"
    assert main(["compare", *dirs, "--out", str(out), "--baseline", "full"]) == 0
    assert capsys.readouterr().out == (out / "comparison.md").read_text()
    assert main(["compare", *dirs, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "comparison.json").read_text()) and printed["baseline"] is None
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    assert main(["compare", *dirs, "--baseline", "nope"]) == 2
    assert "baseline 'nope' is none of the compared runs" in capsys.readouterr().err
