"""The `jpeft` command line, end to end on a tiny model and DialogSum-shaped rows."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
import torch
import transformers

import jpeft
from jpeft.cli import EXAMPLES, main

COMMANDS = ["demo", "train", "plan", "eval", "generate", "merge", "info", "bench", "compare", "forgetting",
            "plot"]


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "jpeft.cli", "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and EXAMPLES[command].startswith(f"jpeft {command}") and "%%" not in out


@pytest.fixture(scope="module")
def trained_adapter(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_train")
    code = main(["train", f"model.path={tiny_run['model']}", f"data.train={tiny_run['train']}",
                 r"data.prompt=Dialogue:\n{dialogue}\nSummary: ", "data.target=summary", "train.steps=2",
                 "train.batch_size=4", "train.seq_len=64", "method.rank=2", f"out_dir={out}"])
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["prompt"] == "Dialogue:\n{dialogue}\nSummary: "  # the shell's \n became a newline
    return out / "adapter"


def test_eval_writes_metrics(tiny_run, trained_adapter, tmp_path, capsys):
    rows = [json.loads(line) for line in open(tiny_run["eval"])]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({**r, "summary2": r["summary"].upper()}) + "\n" for r in rows))
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", tiny_run["model"], "--adapter", str(trained_adapter), "--data", str(data),
                 "--prompt", r"Dialogue:\n{dialogue}\nSummary: ", "--target", "summary,summary2",
                 "--max-new-tokens", "4", "--limit", "3", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert set(printed) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "n"} and printed["n"] == 3


def test_eval_bad_sizes_are_an_error(tiny_run, capsys):
    assert main(["eval", "--model", tiny_run["model"], "--data", tiny_run["eval"], "--prompt", "{dialogue}",
                 "--target", "summary", "--limit", "-1"]) == 2
    assert "need --limit >= 0 (0: every row)" in capsys.readouterr().err
    # 512 positions: 512 new tokens would leave the prompt one (its BOS), more leave it none
    assert main(["eval", "--model", tiny_run["model"], "--data", tiny_run["eval"], "--prompt", "{dialogue}",
                 "--target", "summary", "--max-new-tokens", "513"]) == 2
    assert "max_new_tokens=513 leaves no room for a prompt in the model's 512 positions" in capsys.readouterr().err


def test_generate_top_k_or_top_p_alone_samples(tiny_run, capsys):
    """--top-k / --top-p without --temperature sample at temperature 1 (they used to be ignored: greedy)."""
    args = ["generate", "--model", tiny_run["model"], "--prompt", "#Person1#: Hello", "--max-new-tokens", "8"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    for flag in (["--top-k", "50"], ["--top-p", "0.95"]):
        outputs = set()
        for seed in range(2):
            assert main([*args, *flag, "--seed", str(seed)]) == 0
            outputs.add(capsys.readouterr().out)
        assert outputs - {greedy} and len(outputs) > 1


def test_generate_names_the_generation_config_settings_it_does_not_apply(tiny_run, tmp_path, capsys, caplog):
    import shutil
    import transformers
    model_dir = shutil.copytree(tiny_run["model"], tmp_path / "base")
    transformers.GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.1,
                                  eos_token_id=2).save_pretrained(model_dir)
    args = ["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "4"]
    assert main(args) == 0
    assert "sets do_sample=True, repetition_penalty=1.1, temperature=0.6, top_p=0.9, which" in caplog.text
    assert "greedy unless --temperature" in caplog.text


def test_generate_chat_prompts_in_the_chat_template(tiny_run, tmp_path, capsys):
    import shutil
    from jpeft.generate import generate_text
    from jpeft.models.hf import load_tokenizer
    model_dir = shutil.copytree(tiny_run["model"], tmp_path / "base")
    tok = load_tokenizer(str(model_dir))
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(model_dir)
    args = ["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main([*args, "--chat", "--system", "Be brief."]) == 0
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
                                  add_generation_prompt=True, tokenize=True)["input_ids"]
    model, params = jpeft.from_pretrained(str(model_dir))
    assert capsys.readouterr().out == generate_text(model, params, tok, [ids], 6)[0] + "\n"
    assert main([*args, "--system", "Be brief."]) == 2
    assert "add --chat" in capsys.readouterr().err


def test_eval_missing_column_is_an_error(tiny_run, capsys):
    code = main(["eval", "--model", tiny_run["model"], "--data", tiny_run["eval"], "--prompt", "{dialog}",
                 "--target", "summary"])
    assert code == 2 and "dialog" in capsys.readouterr().err


def test_eval_reads_a_prompt_field_inside_a_column(tiny_run, tmp_path, capsys):
    """`--prompt '{d[text]}'` needs a string at d[text] in every row, not a string column `d` (which it is not)."""
    import json
    rows = [json.loads(line) for line in open(tiny_run["eval"])][:2]
    data = tmp_path / "nested.jsonl"
    data.write_text("".join(json.dumps({"d": {"text": r["dialogue"]}, "summary": r["summary"]}) + "\n" for r in rows))
    args = ["eval", "--model", tiny_run["model"], "--data", str(data), "--target", "summary", "--max-new-tokens", "4"]
    assert main([*args, "--prompt", "{d[text]}"]) == 0 and json.loads(capsys.readouterr().out)["n"] == 2
    assert main([*args, "--prompt", "{d[other]}"]) == 2
    assert "row 1: field 'd[other]' is missing (null)" in capsys.readouterr().err


def test_generate_with_adapter(tiny_run, trained_adapter, capsys):
    """The command prints exactly what the library generates for the same model, adapter and prompt."""
    from jpeft.generate import generate_text
    from jpeft.train.trainer import load_tokenizer

    assert main(["generate", "--model", tiny_run["model"], "--adapter", str(trained_adapter),
                 "--prompt", r"#Person1#: Hello\n", "--max-new-tokens", "6"]) == 0
    model, base = jpeft.from_pretrained(tiny_run["model"])
    params = jpeft.load_adapter(str(trained_adapter), base)
    tokenizer = load_tokenizer(tiny_run["model"])
    [expected] = generate_text(model, params, tokenizer, ["#Person1#: Hello\n"], 6)
    assert capsys.readouterr().out == expected + "\n"


def test_info_lists_every_method_with_its_options(capsys):
    from jpeft.peft.registry import BY_NAME
    assert main(["info", "--methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    options = dict(line.split(": ", 1) for line in lines)
    assert list(options) == list(BY_NAME) == ["full", "lora", "qlora", "vera", "loha", "lokr", "oft", "hra", "ia3",
                                              "road", "trainable_tokens", "bitfit", "norm", "prompt", "p_tuning", "prefix", "llama_adapter", "bottleneck", "classifier"]
    assert "method.use_dora" in options["lora"] and "method.quant" in options["qlora"]
    assert "method.feedforward" in options["ia3"] and "method.tasks" in options["prompt"]
    assert "method.block_share" in options["oft"] and "method.num_cayley_neumann_terms" in options["oft"]
    assert options["hra"] == "method.rank, method.targets, method.gram_schmidt, method.modules_to_save"
    assert options["road"] == "method.targets, method.variant, method.group_size, method.modules_to_save"
    assert options["trainable_tokens"] == "method.targets, method.token_indices, method.modules_to_save"
    assert options["p_tuning"] == "method.num_virtual_tokens, method.projection, method.modules_to_save"
    assert "method.projection" in options["prefix"] and "method.adapter_layers" in options["llama_adapter"]
    assert "method.kind" in options["bottleneck"] and "method.pooling" in options["classifier"]
    assert "method.d_initial" in options["vera"] and options["loha"] == "method.rank, method.alpha, method.targets, method.modules_to_save"
    assert options["lokr"] == ("method.rank, method.alpha, method.targets, method.decompose_both, method.decompose_factor, "
                               "method.modules_to_save")
    assert not any("modules_to_save" in options[name] for name in ("full", "bitfit", "norm", "classifier"))


BLOCK_TORCH = """
import importlib.machinery as machinery
_find = machinery.PathFinder.find_spec
def _no_torch(cls, name, path=None, target=None):
    return None if name.split(".")[0] == "torch" else _find(name, path, target)
machinery.PathFinder.find_spec = classmethod(_no_torch)
"""


def test_no_pytorch_notice_without_pytorch(tiny_run, tmp_path):
    """Without PyTorch (as after `pip install -e .`), jpeft's output has no transformers notice about it."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    plain = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True, env=env)
    assert "PyTorch was not found" in plain.stderr + plain.stdout  # the notice exists when torch is missing
    out = subprocess.run([sys.executable, "-m", "jpeft.cli", "info", "--model", tiny_run["model"]],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "PyTorch was not found" not in out.stderr + out.stdout and "trainable params" in out.stdout


def test_merge_loads_in_transformers(tiny_run, trained_adapter, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--model", tiny_run["model"], "--adapter", str(trained_adapter), "--out", str(out)]) == 0
    model, base = jpeft.from_pretrained(tiny_run["model"])
    adapted = jpeft.load_adapter(str(trained_adapter), base)
    ids = np.arange(1, 12)[None]
    reference = np.asarray(model.apply({"params": adapted}, ids))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids)).logits.numpy(), reference, atol=2e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out) is not None


def test_merging_an_embedding_adapter_under_a_tied_head_says_the_head_changes(tiny_run, tmp_path, caplog):
    """Unmerged, a tied head reads the original table (as in PEFT); merged, the adapted one: said, not silent."""
    from conftest import make_hf_model, save_hf_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_run["model"])
    for tied in (False, True):
        base = save_hf_model(make_hf_model("llama", tie_word_embeddings=tied, vocab_size=len(tokenizer)),
                             tmp_path / f"base-{tied}")
        tokenizer.save_pretrained(base)
        _, params = jpeft.from_pretrained(base)
        jpeft.save_adapter(str(tmp_path / f"adapter-{tied}"),
                           jpeft.LoRA(rank=2, targets=["embed_tokens", "q_proj"]).init(jax.random.key(0), params))
        caplog.clear()
        assert main(["merge", "--model", base, "--adapter", str(tmp_path / f"adapter-{tied}"),
                     "--out", str(tmp_path / f"merged-{tied}")]) == 0
        assert ("to which the LM head is tied" in caplog.text) == tied


def test_verbose_after_the_command_and_a_closed_pipe(tiny_run, tmp_path):
    """The error's "--verbose shows where" works where the user adds it, after the command; a reader that stops
    early (`| head -1`) ends the output without an error."""
    (tmp_path / "taken").write_text("")
    verbose = subprocess.run([sys.executable, "-m", "jpeft.cli", "plot", str(tmp_path), "--out", str(tmp_path / "taken"),
                              "--verbose"], capture_output=True, text=True)
    assert "unrecognized arguments" not in verbose.stderr
    read, write = os.pipe()
    os.close(read)
    closed = subprocess.run([sys.executable, "-m", "jpeft.cli", "info", "--methods"], stdout=write,
                            stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert closed.returncode == 1 and closed.stderr == "", closed.stderr


def test_merge_writes_the_bases_dtype_and_only_its_tokenizer_files(tiny_run, trained_adapter, tmp_path):
    """A bfloat16 base merges in float32 and is written in bfloat16, as PEFT's merge_and_unload keeps it (unless
    --dtype says otherwise); of the base dir's other files only the tokenizer's and the generation config travel."""
    import shutil
    from safetensors import safe_open
    base = tmp_path / "base"
    shutil.copytree(tiny_run["model"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    for stray in ("flax_model.msgpack", "optimizer.pt", "trainer_state.json"):
        (base / stray).write_text("not the merged model's")

    def merged(out, *extra):
        assert main(["merge", "--model", str(base), "--adapter", str(trained_adapter), "--out", str(out), *extra]) == 0
        with safe_open(out / "model.safetensors", "np") as f:
            return {f.get_slice(name).get_dtype() for name in f.keys()}, json.loads((out / "config.json").read_text())

    dtypes, config = merged(tmp_path / "bf16")
    assert dtypes == {"BF16"} and config["dtype"] == "bfloat16"
    assert not {"flax_model.msgpack", "optimizer.pt", "trainer_state.json"} & set(os.listdir(tmp_path / "bf16"))
    assert {f for f in os.listdir(base) if f.startswith("tokenizer")} <= set(os.listdir(tmp_path / "bf16"))
    model, params = jpeft.from_pretrained(tiny_run["model"])
    exact = jpeft.merge(jpeft.load_adapter(str(trained_adapter), params))
    rounded = jpeft.from_pretrained(str(tmp_path / "bf16"))[1]  # float32 on load: the bf16 values, widened
    assert all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool((np.asarray(a.astype(jnp.bfloat16)) == np.asarray(b.astype(jnp.bfloat16))).all()),
        exact, rounded)))
    assert merged(tmp_path / "f32", "--dtype", "float32")[0] == {"F32"}
    from jpeft.hardware import auto_dtype  # auto: the dtype it chose here, written as such
    want = {"bfloat16": ({"BF16"}, "bfloat16"), "float32": ({"F32"}, "float32")}[auto_dtype()]
    dtypes, config = merged(tmp_path / "auto", "--dtype", "auto")
    assert (dtypes, config["dtype"]) == want


def test_merge_never_writes_over_what_it_reads_and_a_file_in_the_way_is_one_line(tiny_run, trained_adapter,
                                                                                   tmp_path, capsys):
    before = sorted(os.listdir(tiny_run["model"]))
    for out in (tiny_run["model"], str(trained_adapter)):
        assert main(["merge", "--model", tiny_run["model"], "--adapter", str(trained_adapter), "--out", out]) == 2
        assert "would overwrite what it reads" in capsys.readouterr().err
    assert sorted(os.listdir(tiny_run["model"])) == before
    (tmp_path / "taken").write_text("not a directory")
    assert main(["merge", "--model", tiny_run["model"], "--adapter", str(trained_adapter),
                 "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeft merge: error: a file is where a directory goes") and "taken" in err
    assert "Traceback" not in err
    # an adapter dir as --out: transformers would apply that adapter on top of the merged weights
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    assert main(["merge", "--model", tiny_run["model"], "--adapter", str(trained_adapter), "--out", str(stale)]) == 2
    assert "holds an adapter (adapter_config.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:  # nothing to merge: --adapter is required
        main(["merge", "--model", tiny_run["model"], "--out", str(tmp_path / "none")])
    assert exit.value.code == 2 and "the following arguments are required: --adapter" in capsys.readouterr().err


def test_merge_and_info_take_a_base_without_tokenizer_files(tiny_run, trained_adapter, tmp_path, capsys):
    """Neither reads text: a weights-only base merges (nothing to copy) and is described."""
    import shutil
    base = tmp_path / "weights_only"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_run["model"], name), base / name)
    assert main(["info", "--model", str(base), "--adapter", str(trained_adapter)]) == 0
    assert "trainable params: " in capsys.readouterr().out
    assert main(["merge", "--model", str(base), "--adapter", str(trained_adapter), "--out", str(tmp_path / "m")]) == 0
    assert jpeft.from_pretrained(str(tmp_path / "m"))[0].config.model_type == "llama"


def test_info_reports_counts(tiny_run, trained_adapter, capsys):
    assert main(["info", "--model", tiny_run["model"], "--adapter", str(trained_adapter)]) == 0
    out = capsys.readouterr().out
    _, base = jpeft.from_pretrained(tiny_run["model"])
    trainable, total = jpeft.count_parameters(jpeft.load_adapter(str(trained_adapter), base))
    assert "architecture: llama" in out and f"trainable params: {trainable:,d} || all params: {total:,d}" in out


@pytest.mark.parametrize("method", ["norm", "bitfit"])
def test_info_counts_what_an_adapter_training_base_leaves_trains(tiny_run, tmp_path, capsys, method):
    """Norm tuning's dir (PEFT's LN tuning: its norms whole, as PEFT counts them) and BitFit's (jpeft's own) train
    base leaves, which only their configs name: counted from them, not as no parameters at all."""
    _, params = jpeft.from_pretrained(tiny_run["model"])
    method = jpeft.NormTuning() if method == "norm" else jpeft.BitFit(targets=["q_proj", "down_proj"])
    adapted = method.init(jax.random.key(0), params)
    jpeft.save_adapter(str(tmp_path / "adapter"), adapted, method=method)
    assert main(["info", "--model", tiny_run["model"], "--adapter", str(tmp_path / "adapter")]) == 0
    want, _ = jpeft.count_parameters(adapted, method.mask(adapted))  # llama's norms: scales only, as PEFT's
    assert want > 0 and f"trainable params: {want:,d} ||" in capsys.readouterr().out


def test_info_describes_an_encoder_decoder(tmp_path, capsys):
    from conftest import make_t5
    assert main(["info", "--model", make_t5(tmp_path, "flan-t5")[1]]) == 0
    out = capsys.readouterr().out
    assert "architecture: t5 · 2 encoder + 3 decoder layers" in out and "8 relative-position buckets" in out


def test_info_lists_the_families_and_says_opts_positions_are_learned(tmp_path, capsys):
    """Every model_type a config.json may name; OPT's positions are a table, MPT's ALiBi's biases, not RoPE."""
    from conftest import FAMILIES, make_hf_model, save_hf_model
    from jpeft.models.families import SUPPORTED_TYPES
    assert main(["info", "--families"]) == 0
    families = capsys.readouterr().out.split()
    assert families == list(SUPPORTED_TYPES) and {"llama", "opt", "gpt2", "t5"} <= set(families)
    assert main(["info", "--model", save_hf_model(make_hf_model("opt", **FAMILIES["opt"]), tmp_path / "opt")]) == 0
    out = capsys.readouterr().out
    assert "architecture: opt · 2 layers" in out and "learned positions" in out and "rope" not in out
    assert main(["info", "--model", save_hf_model(make_hf_model("mpt", **FAMILIES["mpt"]), tmp_path / "mpt")]) == 0
    out = capsys.readouterr().out
    assert "architecture: mpt · 2 layers" in out and "ALiBi" in out and "rope" not in out


def test_bad_override_is_an_error(tiny_run, capsys):
    assert main(["train", f"model.path={tiny_run['model']}", "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err

