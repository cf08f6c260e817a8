"""`jpeft plot`: PNGs from a run's metrics.jsonl, also while the run is writing it."""
import json

import matplotlib.image
import pytest

from jpeft.cli import main
from jpeft.errors import ConfigError
from jpeft.plot import panels, plot_run

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(path, records, tail=""):
    path.mkdir(exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)


def test_plots_a_running_run_and_skips_its_half_written_line(tmp_path):
    records = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "grad_norm": 1.0 / s} for s in range(1, 6)]
    write_run(tmp_path / "run", records, tail='{"step": 6, "loss": 0.4')
    paths = plot_run(str(tmp_path / "run"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["loss.png", "lr.png", "grad_norm.png"]  # no eval metrics yet
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG
        assert matplotlib.image.imread(p).shape[:2] == (400, 600)


def test_eval_metrics_get_their_own_plot_and_cli_prints_paths(tmp_path, capsys):
    records = [{"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "eval_loss": 2.2},
               {"step": 2, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "eval_loss": 1.9, "eval_rougeL": 0.2,
                "eval_bleu": 3.0}]
    write_run(tmp_path / "run", records)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "pngs")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "pngs" / n) for n in ("loss.png", "lr.png", "grad_norm.png", "eval.png")]


def test_a_mixture_and_forgetting_probes_are_plotted_with_the_losses_and_on_their_own():
    records = [{"step": 1, "loss": 2.0, "loss_summarize": 2.5, "loss_replay": 1.5, "lr": 1e-3, "grad_norm": 1.0},
               {"step": 2, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "eval_loss": 1.9, "eval_summarize_loss": 2.1,
                "eval_summarize_rougeL": 0.2, "forget_wiki_perplexity": 21.0, "forget_wiki_base": 20.0,
                "forget_wiki_change": 0.05}]
    assert panels(records) == {"loss.png": ("loss", "eval_loss", "eval_summarize_loss", "loss_replay",
                                            "loss_summarize"),
                               "lr.png": ("lr",), "grad_norm.png": ("grad_norm",),
                               "eval.png": ("eval_summarize_rougeL",), "forgetting.png": ("forget_wiki_change",)}
    assert panels([{"step": 1, "loss": 2.0}]) == {"loss.png": ("loss",)}  # no empty lr / grad_norm plots


def test_errors_name_the_path_and_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="metrics.jsonl not found: pass the out_dir"):
        plot_run(str(tmp_path / "nowhere"))
    write_run(tmp_path / "empty", [])
    with pytest.raises(ConfigError, match="has no records yet"):
        plot_run(str(tmp_path / "empty"))
    write_run(tmp_path / "bad", [], tail="not json\n{}\n")
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        plot_run(str(tmp_path / "bad"))
