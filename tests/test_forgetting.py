"""Forgetting probes (jpeft.forgetting, `jpeft forgetting`, eval.forgetting), each score checked against a
second computation: the transformers (and PEFT) PyTorch model for perplexity, constructed answers for accuracy."""
import json
import math

import jax
import numpy as np
import pytest
import torch
import transformers

import jpeft
from conftest import dialogsum_rows, read_metrics, run_config
from jpeft import tree as T
from jpeft.cli import main
from jpeft.config import load_config
from jpeft.errors import CheckpointError, ConfigError, DataError
from jpeft.evaluate import predict
from jpeft.forgetting import read_probe, read_probes, report, score, tuned_params
from jpeft.train.checkpoint import run_fingerprint
from jpeft.train.trainer import load_tokenizer, train

MAX_NEW = 4


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def torch_perplexity(model, pairs) -> float:
    """exp of the mean NLL, from a PyTorch causal LM, of the scored ids of each (context ids, scored ids) pair."""
    total, count = 0.0, 0
    for context, scored in pairs:
        ids = torch.tensor([context + scored])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[len(context) - 1:]
        total, count = total + nll.sum().item(), count + len(nll)
    return math.exp(total / count)


def text_pairs(tokenizer, texts, seq_len):
    """A text probe's rows as jpeft scores them: BOS + text + EOS cut to seq_len + 1 tokens, all but BOS scored."""
    ids = [(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])[:seq_len + 1] for t in texts]
    return [(x[:1], x[1:]) for x in ids]


def task_pairs(tokenizer, rows):
    """A task probe's rows: the prompt (with BOS) as context, target + EOS scored."""
    return [(tokenizer(r["prompt"])["input_ids"],
             tokenizer(r["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for r in rows]


def torch_model(model_dir, adapter=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is None:
        return model
    import peft
    return peft.PeftModel.from_pretrained(model, adapter).eval()


@pytest.fixture(scope="module")
def setup(tiny_run, tmp_path_factory):
    """Probe files on rows the tiny model never saw, an adapter and a fully fine-tuned dir of its base."""
    root = tmp_path_factory.mktemp("forgetting")
    model, base = jpeft.from_pretrained(tiny_run["model"], dtype="float32")
    tokenizer = load_tokenizer(tiny_run["model"])
    rows = dialogsum_rows(6, start=100)
    tasks = [{"prompt": r["dialogue"].split("\n")[0] + "\nSummary: ", "target": r["summary"]} for r in rows[:3]]
    greedy = predict(model, base, tokenizer, tasks, "{prompt}", MAX_NEW)
    assert all(any(c.isalnum() for c in g) for g in greedy)  # ROUGE sees words in them
    rng = np.random.default_rng(0)
    adapted = jpeft.LoRA(rank=2, alpha=4, targets=["q_proj", "v_proj"]).init(jax.random.key(0), base)
    adapted = T.map_with_path(lambda p, v: rng.normal(0, 0.3, v.shape).astype(v.dtype) if p.endswith("lora_b")
                              else v, adapted)
    jpeft.save_adapter(str(root / "adapter"), adapted, base_model_name_or_path=tiny_run["model"])
    noisy = T.map_with_path(lambda p, v: v + rng.normal(0, 0.05, v.shape).astype(v.dtype), base)
    jpeft.save_pretrained(str(root / "finetuned"), model, noisy, tokenizer_from=tiny_run["model"])
    return {
        "model": model, "base": base, "tokenizer": tokenizer, "dir": tiny_run["model"], "root": root,
        "texts": [r["dialogue"] for r in rows],
        "text": write_jsonl(root / "dialogues.jsonl", [{"text": r["dialogue"], "id": i} for i, r in enumerate(rows)]),
        "tasks": tasks,
        "task": write_jsonl(root / "task.jsonl", tasks),
        # the base's own greedy answers for the first two rows: its accuracy is 2/3 by construction
        "exact": write_jsonl(root / "exact.jsonl", [{**t, "target": g if i < 2 else "no such answer"}
                                                    for i, (t, g) in enumerate(zip(tasks, greedy))]),
        # ... and for every row: its ROUGE-L is 1
        "echo": write_jsonl(root / "echo.jsonl", [{**t, "target": g} for t, g in zip(tasks, greedy)]),
        "adapter": str(root / "adapter"), "finetuned": str(root / "finetuned"),
    }


@pytest.mark.parametrize("seq_len", [48, None])
def test_text_perplexity_equals_pytorch(setup, seq_len):
    """Every token of each text after BOS, EOS included, cut to seq_len (default: the model's 512 positions)."""
    probe = read_probe(setup["text"])
    assert (probe.kind, probe.metric, len(probe.rows)) == ("text", "perplexity", 6)
    expected = torch_perplexity(torch_model(setup["dir"]), text_pairs(setup["tokenizer"], setup["texts"],
                                                                     seq_len or 512))
    got = score(setup["model"], setup["base"], setup["tokenizer"], probe, seq_len=seq_len, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-4)


def test_task_perplexity_is_the_targets_given_the_prompts(setup):
    probe = read_probe(setup["task"] + ":perplexity")
    assert (probe.kind, probe.metric) == ("task", "perplexity")
    expected = torch_perplexity(torch_model(setup["dir"]), task_pairs(setup["tokenizer"], setup["tasks"]))
    assert score(setup["model"], setup["base"], setup["tokenizer"], probe) == pytest.approx(expected, rel=1e-4)


def forgetting_json(setup, capsys, *tuned):
    assert main(["forgetting", "--model", setup["dir"], *tuned, "--dtype", "float32", "--json", "--limit", "3",
                 "--max-new-tokens", str(MAX_NEW), "--probe", setup["text"], setup["exact"] + ":accuracy",
                 setup["echo"]]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_against_pytorch_and_peft(setup, capsys):
    by_adapter = forgetting_json(setup, capsys, "--adapter", setup["adapter"])
    by_finetuned = forgetting_json(setup, capsys, "--finetuned", setup["finetuned"])
    text, exact, echo = setup["text"], setup["exact"], setup["echo"]
    pairs = text_pairs(setup["tokenizer"], setup["texts"][:3], 512)  # --limit 3
    for result, tuned in ((by_adapter, torch_model(setup["dir"], setup["adapter"])),
                          (by_finetuned, torch_model(setup["finetuned"]))):
        assert list(result) == ["probes"] and list(result["probes"]) == [text, exact, echo]
        probes = result["probes"]
        assert [probes[p]["metric"] for p in probes] == ["perplexity", "accuracy", "rougeL"]
        for entry in probes.values():
            assert set(entry) == {"metric", "base", "tuned", "change"}
            assert entry["change"] == pytest.approx((entry["tuned"] - entry["base"]) / entry["base"])
        assert probes[text]["base"] == pytest.approx(torch_perplexity(torch_model(setup["dir"]), pairs), rel=1e-4)
        assert probes[text]["tuned"] == pytest.approx(torch_perplexity(tuned, pairs), rel=1e-4)
        assert probes[text]["change"] != 0
        assert probes[exact]["base"] == pytest.approx(2 / 3) and probes[echo]["base"] == pytest.approx(1.0)
        assert 0 <= probes[exact]["tuned"] <= 1 and 0 <= probes[echo]["tuned"] <= 1
    assert {p: e["base"] for p, e in by_adapter["probes"].items()} == pytest.approx(
        {p: e["base"] for p, e in by_finetuned["probes"].items()})


def test_cli_table(setup, capsys):
    args = ["forgetting", "--model", setup["dir"], "--finetuned", setup["finetuned"], "--dtype", "float32",
            "--limit", "2", "--probe", setup["text"]]
    assert main([*args, "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["probes"][setup["text"]]
    assert main(args) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split() == ["probe", "metric", "base", "tuned", "change"]
    assert line.split() == [setup["text"], "perplexity", f"{entry['base']:.2f}", f"{entry['tuned']:.2f}",
                            f"{entry['change']:+.1%}"]
    assert len(header) == len(line)  # aligned


def test_library_report_of_an_untouched_model_changes_nothing(setup):
    probes = read_probes([setup["text"], setup["echo"]], "test", limit=2)
    result = report(setup["model"], setup["base"], setup["base"], setup["tokenizer"], probes, max_new_tokens=MAX_NEW)
    assert [e["change"] for e in result["probes"].values()] == [0.0, 0.0]


def test_forgetting_is_forced_by_a_disjoint_fine_tune(tiny_run, tmp_path, capsys):
    """A base that learnt dialogues, fully fine-tuned on a repeated string of digits: its held-out dialogues'
    perplexity rises at each evaluation while the new task's loss falls; the figures equal what
    `jpeft forgetting` finds in the exported model."""
    lm = ["model.dtype=float32", "method.name=full", "data.prompt=null", "data.target=null", "data.eval=null",
          "data.text=text", "train.seq_len=64", "train.batch_size=4", "train.log_every=1"]
    dialogues = write_jsonl(tmp_path / "dialogues.jsonl", [{"text": r["dialogue"]} for r in dialogsum_rows(40)])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"text": r["dialogue"]} for r in dialogsum_rows(6, 40)])
    digits = write_jsonl(tmp_path / "digits.jsonl", [{"text": " ".join("7 3 9 1".split() * 16)}] * 16)
    train(run_config(tiny_run, tmp_path / "base", *lm, f"data.train={dialogues}", "train.steps=30",
                     "train.lr=1e-2"), progress=False)
    base = str(tmp_path / "base" / "model")
    out = tmp_path / "digits"
    train(run_config(tiny_run, out, *lm, f"model.path={base}", f"data.train={digits}", "train.steps=20",
                     "train.eval_every=10", f"eval.forgetting=[{held_out}]"), progress=False)
    records = read_metrics(out)
    evals = [r for r in records if "forget_held_out_perplexity" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert records[-1]["loss"] < records[0]["loss"] / 2
    assert 0 < evals[0]["forget_held_out_change"] < evals[1]["forget_held_out_change"]
    assert main(["forgetting", "--model", base, "--finetuned", str(out / "model"), "--dtype", "float32",
                 "--seq-len", "64", "--probe", held_out, "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)["probes"][held_out]
    assert entry["base"] == pytest.approx(evals[-1]["forget_held_out_base"], rel=1e-5)
    assert entry["tuned"] == pytest.approx(evals[-1]["forget_held_out_perplexity"], rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k.startswith("forget_")} == {
        k: v for k, v in evals[-1].items() if k.startswith("forget_")}
    # Replay: the same fine-tune with a quarter of its examples the base's own dialogues (each as long as
    # several windows of digits: about half the rows) forgets less, and still learns
    mixture = json.dumps([{"name": "digits", "train": digits, "text": "text", "weight": 0.75},
                          {"name": "replay", "train": dialogues, "text": "text", "weight": 0.25}])
    replayed = tmp_path / "replayed"
    train(run_config(tiny_run, replayed, *lm, f"model.path={base}", "data.train=null", "data.text=null",
                     f"data.mixture={mixture}",
                     "train.steps=20", "train.eval_every=10", f"eval.forgetting=[{held_out}]"), progress=False)
    with_replay = [r for r in read_metrics(replayed) if "forget_held_out_perplexity" in r]
    assert with_replay[-1]["forget_held_out_change"] < evals[-1]["forget_held_out_change"] / 2
    digits_loss = [r["loss_digits"] for r in read_metrics(replayed) if "loss_digits" in r]
    assert digits_loss[-1] < digits_loss[0] / 2


def test_eval_forgetting_is_logged_at_each_evaluation(setup, tiny_run, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny_run, out, "train.eval_every=3", f"data.max_new_tokens={MAX_NEW}",
                     f"eval.forgetting={setup['text']},{setup['exact']}:accuracy"), progress=False)
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    base_perplexity = score(setup["model"], setup["base"], setup["tokenizer"], read_probe(setup["text"]), 96, 4)
    for r in evals:
        assert r["forget_dialogues_base"] == pytest.approx(base_perplexity, rel=1e-5)
        assert r["forget_exact_base"] == pytest.approx(2 / 3)
        assert r["forget_dialogues_change"] == pytest.approx(
            (r["forget_dialogues_perplexity"] - base_perplexity) / base_perplexity, rel=1e-4)
        assert r["forget_exact_change"] == pytest.approx((r["forget_exact_accuracy"] - 2 / 3) / (2 / 3))
        assert all(isinstance(v, float) for k, v in r.items() if k.startswith("forget_"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["forget_dialogues_perplexity"] == evals[-1]["forget_dialogues_perplexity"]
    assert summary["eval_loss"] == evals[-1]["eval_loss"]


def test_a_missing_probe_fails_before_training(tiny_run, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"eval.forgetting: probe file '.*nope.jsonl' not found"):
        train(run_config(tiny_run, out, f"eval.forgetting=[{tmp_path / 'nope.jsonl'}]"), progress=False)
    assert not out.exists()


def test_probes_do_not_shape_the_trained_state(tiny_run, tmp_path):
    """A resumed run may add, drop or change its probes, as it may its other evaluation keys."""
    plain, _ = run_fingerprint(run_config(tiny_run, tmp_path))
    assert run_fingerprint(run_config(tiny_run, tmp_path, "eval.forgetting=[a.jsonl]"))[0] == plain
    assert run_fingerprint(run_config(tiny_run, tmp_path, "train.lr=1e-3"))[0] != plain  # the fingerprint sees keys


def test_eval_section_is_checked_like_the_others(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("eval:\n  forgetting: [a.jsonl, 'b.jsonl:accuracy']\n")
    assert load_config(str(config)).eval.forgetting == ["a.jsonl", "b.jsonl:accuracy"]
    assert load_config(None, ["eval.forgetting=a.jsonl,b.csv"]).eval.forgetting == ["a.jsonl", "b.csv"]
    with pytest.raises(ConfigError, match="did you mean 'eval.forgetting'"):
        load_config(None, ["eval.forgeting=a.jsonl"])
    config.write_text("eval:\n  probes: [a.jsonl]\n")
    with pytest.raises(ConfigError, match="unknown config key 'eval.probes'.*valid keys in 'eval': forgetting"):
        load_config(str(config))


def test_probe_errors_name_the_file_and_what_to_do(setup, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    assert main(["forgetting", "--model", setup["dir"], "--adapter", setup["adapter"], "--probe", bad]) == 2
    err = capsys.readouterr().err
    assert f"--probe: probe file '{bad}' has columns question, answer; a probe needs a 'text' column" in err
    with pytest.raises(DataError, match="'text' rows is scored by perplexity only; accuracy needs 'prompt' and"):
        read_probe(setup["text"] + ":accuracy")
    with pytest.raises(DataError, match="not found; .*FILE:METRIC with METRIC one of perplexity, rougeL, accuracy"):
        read_probe(setup["text"] + ":acc")
    other = tmp_path / "other"
    other.mkdir()
    twin = write_jsonl(other / "dialogues.jsonl", [{"text": "hello"}])
    with pytest.raises(ConfigError, match="eval.forgetting: '.*' and '.*' share the name 'dialogues'"):
        read_probes([setup["text"], twin], "eval.forgetting")
    with pytest.raises(ConfigError, match="is given twice"):
        read_probes([setup["echo"], setup["echo"] + ":accuracy"], "--probe")


@pytest.mark.parametrize("option", [["--limit", "-1"], ["--seq-len", "0"], ["--batch-size", "0"],
                                    ["--max-new-tokens", "0"]])
def test_cli_sizes_are_checked(setup, option, capsys):
    assert main(["forgetting", "--model", setup["dir"], "--adapter", setup["adapter"], "--probe", setup["text"],
                 *option]) == 2
    assert "need --limit >= 0 (0: every row), --batch-size >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("tuned, message", [
    (["--adapter", "a", "--finetuned", "b"], "argument --finetuned: not allowed with argument --adapter"),
    ([], "one of the arguments --adapter --finetuned is required")])
def test_cli_needs_exactly_one_fine_tuned_model(tuned, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["forgetting", "--model", "m", *tuned, "--probe", "p.jsonl"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_library_needs_exactly_one_fine_tuned_model_of_the_base_shapes(setup, tmp_path):
    for adapter, finetuned, word in (("a", "b", "both were"), (None, None, "neither was")):
        with pytest.raises(ConfigError, match=f"an adapter dir .* or a fully fine-tuned model dir .*; {word} given"):
            tuned_params(setup["base"], adapter, finetuned)
    from conftest import make_hf_model, save_hf_model
    other = save_hf_model(make_hf_model("llama", hidden_size=48), tmp_path / "other")
    with pytest.raises(CheckpointError, match="not a fine-tune of the base model"):
        tuned_params(setup["base"], finetuned=other)
