"""`jpeft demo` end to end on tiny budgets: both fine-tunes, the method comparison, the T5 family, and its
errors."""
import json

import pytest
import yaml

from jpeft.cli import main

DIALOGUE_PERPLEXITY = ("forget_dialogues_perplexity", "forget_dialogues_base", "forget_dialogues_change")


def check_forgetting_column(summary: dict, printed: str) -> None:
    """The base's held-out dialogue perplexity before (the base row's own) and after each fine-tune, its change."""
    before = summary["base"]["forget_dialogues_perplexity"]
    for name in ("base", "full", "lora"):
        after = summary[name]["forget_dialogues_perplexity"]
        assert summary[name]["forget_dialogues_base"] == before and after > 1
        assert summary[name]["forget_dialogues_change"] == pytest.approx((after - before) / before)
    assert summary["base"]["forget_dialogues_change"] == 0 and summary["full"]["forget_dialogues_change"] != 0
    assert "dialogues perplexity" in printed and "dialogues change" in printed


def test_demo_tiny(tmp_path, capsys):
    """The default methods, and with --replay each again on a mixture that replays the base's own task."""
    assert main(["demo", "--out", str(tmp_path), "--preset", "tiny", "--replay"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"base", "full", "lora", "full+replay", "lora+replay", "lead", "trainable_params",
                            "total_params", "seconds"}
    for name in ("full+replay", "lora+replay"):
        mixture = yaml.safe_load((tmp_path / name / "config.yaml").read_text())["data"]["mixture"]
        assert [(m["name"], m["weight"]) for m in mixture] == [("summarize", 0.8), ("replay", 0.2)]
        assert mixture[1]["text"] == "dialogue" and mixture[0]["prompt"].endswith("\nSummary: ")
        assert summary[name]["forget_dialogues_change"] != summary[name.split("+")[0]]["forget_dialogues_change"]
    assert summary["trainable_params"]["lora+replay"] == summary["trainable_params"]["lora"]
    for name in ("base", "full", "lora", "full+replay", "lora+replay"):
        assert set(summary[name]) == {"rouge1", "rouge2", "rougeL", "bleu", "nll", *DIALOGUE_PERPLEXITY}
    assert summary["trainable_params"]["full"] == summary["total_params"] > summary["trainable_params"]["lora"]
    for path in ("base/config.json", "base/tokenizer.json", "full/model/model.safetensors",
                 "lora/adapter/adapter_config.json", "loss_curves.png"):
        assert (tmp_path / path).exists(), path
    assert 1 <= summary["distinct_outputs"]["lora"] <= 4 and summary["machine"]["dtype"] in ("float32", "bfloat16")
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and "distinct outputs of 4 held-out rows" in out and "flags:" in out
    check_forgetting_column(summary, out)


def test_demo_t5_family(tmp_path, capsys):
    """The seed table's experiment scaled down: a T5 base, full and LoRA fine-tunes, the same table."""
    assert main(["demo", "--out", str(tmp_path), "--preset", "tiny", "--family", "t5"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["family"] == "t5" and json.loads((tmp_path / "base/config.json").read_text())["model_type"] == "t5"
    for name in ("base", "full", "lora"):
        assert set(summary[name]) == {"rouge1", "rouge2", "rougeL", "bleu", "nll", *DIALOGUE_PERPLEXITY}
    assert summary["trainable_params"]["full"] == summary["total_params"] > summary["trainable_params"]["lora"]
    out = capsys.readouterr().out
    assert "ROUGE-L" in out
    check_forgetting_column(summary, out)  # a prefix LM's: each dialogue's second half given its first
    assert main(["demo", "--out", str(tmp_path / "x"), "--preset", "tiny", "--family", "t5",
                 "--methods", "lora,llama_adapter"]) == 2
    err = capsys.readouterr().err
    assert "'llama_adapter' acts at the attention_output" in err and "PEFT has no adaption prompt for T5" in err
    assert "classifier" not in err.split("use one of")[1]  # the methods T5 takes
    assert main(["demo", "--out", str(tmp_path / "y"), "--preset", "tiny", "--family", "t5",
                 "--methods", "classifier"]) == 2
    assert "'classifier' acts at the pool insertion point" in capsys.readouterr().err


def test_demo_data_without_its_columns_or_rows_is_one_line(tmp_path, capsys):
    rows = [{"dialogue": f"#Person1#: hi {i}", "summary": f"greeting {i}"} for i in range(9)]
    for name, data in (("columns", [{"text": "no dialogue"}] * 20), ("few", rows[:8])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    assert main(["demo", "--out", str(tmp_path / "a"), "--preset", "tiny", "--data", str(tmp_path / "columns.jsonl")]) == 2
    assert "has no column 'dialogue'; columns are: text" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "b"), "--preset", "tiny", "--data", str(tmp_path / "few.jsonl")]) == 2
    assert "8 rows; the tiny demo holds out 4 for scoring and needs more than 8" in capsys.readouterr().err


def test_demo_methods_share_one_budget_and_end_in_the_compare_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--preset", "tiny", "--methods", "lora,ia3,classifier"]) == 0
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["lead", "base", "lora", "ia3", "classifier"]
    assert table["baseline"] == "base" and "eval_macro_f1" in table["columns"]
    classifier = table["rows"][-1]  # scored on held-out summary pairs, by accuracy, not by the summaries' NLL
    assert 0 <= classifier["eval_accuracy"] <= 1 and "eval_loss" not in classifier
    printed = capsys.readouterr().out
    assert all(f"| {name} " in printed for name in ("lead", "base", "lora", "ia3"))
    assert printed.startswith((tmp_path / "comparison.md").read_text().rstrip("\n"))
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"base", "lora", "ia3", "lead"} and "full" not in summary
    for name, run in zip(("lora", "ia3"), table["rows"][2:]):
        trained = json.loads((tmp_path / name / "summary.json").read_text())  # written by the trainer
        assert trained["method"] == name and trained["steps"] == 3 and trained["peak_rss_bytes"] > 0
        assert 0 < trained["trainable_params"] == summary["trainable_params"][name] < trained["total_params"]
        assert run["eval_loss"] == summary[name]["nll"] and "eval_loss" in trained  # the demo's own scoring wins
        assert (tmp_path / name / "adapter" / "adapter_config.json").exists()
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert (config["train"]["steps"], config["train"]["batch_size"], config["train"]["seq_len"]) == (3, 4, 96)
    assert table["rows"][2]["delta_eval_loss"] == pytest.approx(summary["lora"]["nll"] - summary["base"]["nll"])


def test_demo_unknown_method_lists_the_available_ones(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--preset", "tiny", "--methods", "lora,lorra"]) == 2
    err = capsys.readouterr().err
    assert "no such method for the demo: lorra; available: full, lora, qlora" in err and "(or all)" in err
    assert not (tmp_path / "work").exists()  # refused before any work


def test_demo_all_is_every_method():
    from jpeft.demo import parse_methods
    from jpeft.peft.registry import BY_NAME
    assert parse_methods("all") == list(BY_NAME)
    assert parse_methods("all", "t5") == [m for m in BY_NAME if m not in ("llama_adapter", "classifier")]
    assert parse_methods(" lora, ia3,lora") == ["lora", "ia3"]


def test_demo_presets_are_options_of_their_methods():
    """A preset option the method does not take would only warn at run time; this test says it first."""
    from jpeft.config import method_options
    from jpeft.demo import METHOD_PRESETS, PRESETS
    from jpeft.peft.registry import BY_NAME
    for presets in (METHOD_PRESETS, *(p.get("methods", {}) for p in PRESETS.values())):
        for name, options in presets.items():
            assert name in BY_NAME and set(options) - {"lr"} <= set(method_options(name)), name


def test_demo_missing_data_is_an_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: demo data not found; pass --data" in capsys.readouterr().err


def test_a_stop_request_ends_the_demo_and_the_same_command_resumes(tmp_path, capsys, monkeypatch, caplog):
    """A SIGTERM (or Ctrl-C) while the demo fine-tunes: that training saves its checkpoint and the demo stops
    there (the shell's code for SIGTERM), rather than going on with a half-trained run; the same command again
    resumes it and finishes."""
    from jpeft.train import stop
    entered = []
    real_enter = stop.StopRequests.__enter__
    monkeypatch.setattr(stop.StopRequests, "__enter__", lambda self: entered.append(self) or real_enter(self))
    monkeypatch.setattr(stop.StopRequests, "requested", lambda self: "SIGTERM" if len(entered) == 2 else None)
    args = ["demo", "--out", str(tmp_path), "--preset", "tiny", "--methods", "lora"]
    assert main(args) == 143  # the base trained; the fine-tune stopped after its first step
    assert "stopped by SIGTERM while training lora, with its checkpoint saved" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "lora" / "adapter").exists()
    monkeypatch.undo()
    caplog.set_level("INFO", "jpeft")
    assert main(args) == 0
    assert f"resuming {tmp_path / 'lora'} from step 1" in caplog.text
    assert json.loads((tmp_path / "lora" / "summary.json").read_text())["steps"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["lora"]["nll"] > 0
