"""The `jpeft` command: parses arguments and calls library functions, nothing more."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

EXAMPLES = {
    "demo": "jpeft demo --out runs/demo   (or: jpeft demo --methods lora,ia3,bitfit --out runs/demo_peft)",
    "train": "jpeft train configs/dialogsum_lora.yaml model.path=my_llama train.steps=200 method.rank=16",
    "eval": ("jpeft eval --model my_llama --adapter runs/lora/adapter --data test.jsonl "
             "--prompt 'Dialogue:\\n{dialogue}\\nSummary: ' --target summary1,summary2,summary3 --limit 100\n"
             "  jpeft eval --model runs/sentiment/model --data test.jsonl --prompt 'Review: {text}' --label label"),
    "generate": "jpeft generate --model my_llama --adapter runs/lora/adapter --prompt 'Hello' --max-new-tokens 32",
    "merge": "jpeft merge --model my_llama --adapter runs/lora/adapter --out merged_llama",
    "info": "jpeft info --model my_llama --adapter runs/lora/adapter   (or: jpeft info --methods)",
    "bench": "jpeft bench --against hf-peft --json",
    "plan": "jpeft plan configs/llama3_8b_lora_8gpu.yaml model.path=Meta-Llama-3-8B --devices 8 --device-memory 80GB",
    "plot": "jpeft plot runs/lora   (writes runs/lora/plots/loss.png, lr.png, grad_norm.png, eval.png)",
    "compare": "jpeft compare runs/full runs/lora runs/ia3 --baseline full --out runs   (comparison.md/json/png)",
    "forgetting": ("jpeft forgetting --model my_llama --adapter runs/lora/adapter --probe wiki.jsonl qa.jsonl:accuracy "
                   "--limit 200 --json\n"
                   "  jpeft forgetting --model my_llama --finetuned runs/full/model --probe wiki.jsonl"),
}


def unescape(text: str) -> str:
    r"""Templates typed on a shell: `\n` and `\t` mean newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def load(model_dir: str, adapter_dir: str | None, dtype: str | None = None):
    """(model, params, tokenizer) for a base HF dir plus an optional PEFT adapter dir."""
    import jpeft
    from jpeft.models.hf import load_tokenizer

    model, params = jpeft.from_pretrained(model_dir, dtype=dtype)
    if adapter_dir:
        params = jpeft.load_adapter(adapter_dir, params)
    return model, params, load_tokenizer(model_dir)


def check_chat(args) -> None:
    from jpeft.errors import ConfigError
    if args.system is not None and not args.chat:
        raise ConfigError("--system is the system message of a --chat prompt; add --chat")
    if args.chat and getattr(args, "label", None):
        raise ConfigError("--chat renders prompts for generation; a classifier (--label) reads its prompt as it is")


def check_sizes(args) -> None:
    """eval's and forgetting's --limit, --batch-size, --max-new-tokens (and forgetting's --seq-len), before any
    model loads."""
    from jpeft.errors import ConfigError
    seq_len = getattr(args, "seq_len", None)
    if args.limit < 0 or args.batch_size < 1 or args.max_new_tokens < 1 or seq_len is not None and seq_len < 2:
        also = " and --seq-len >= 2" if hasattr(args, "seq_len") else ""
        raise ConfigError(f"need --limit >= 0 (0: every row), --batch-size >= 1, --max-new-tokens >= 1{also}; got "
                          f"--limit {args.limit}, --batch-size {args.batch_size}, --max-new-tokens {args.max_new_tokens}"
                          f"{f', --seq-len {seq_len}' if also else ''}")


def cmd_demo(args) -> None:
    from jpeft.demo import run_demo
    run_demo(args.out, data=args.data, preset=args.preset, seed=args.seed, methods=args.methods, family=args.family,
             replay=args.replay)


def run_config(args):
    """The RunConfig of `CONFIG [key=value ...]` arguments (the file is optional when all are overrides)."""
    from jpeft.config import load_config
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not os.path.exists(config):  # only overrides were given
        config, overrides = None, [config, *overrides]
    overrides = [unescape(o) if o.startswith("data.prompt=") else o for o in overrides]
    return load_config(config, overrides)


def cmd_train(args) -> None:
    from jpeft.train import train
    record = train(run_config(args))
    print(json.dumps(record))


def cmd_plan(args) -> None:
    import jax

    from jpeft.errors import ConfigError
    from jpeft.parallel.plan import format_plan, parse_size, plan
    memory = None if args.device_memory is None else parse_size(args.device_memory)
    if args.devices is not None and args.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {args.devices}")
    result = plan(run_config(args), jax.local_device_count() if args.devices is None else args.devices, memory)
    print(json.dumps(result.to_dict()) if args.json else format_plan(result))


def cmd_eval(args) -> None:
    from jpeft.data import check_columns, load_rows
    from jpeft.data.tokenize import template_fields
    from jpeft.errors import ConfigError
    from jpeft.evaluate import evaluate_classification, evaluate_generation
    from jpeft.peft.classifier import read_labels

    prompt, targets = unescape(args.prompt), [t for t in (args.target or "").split(",") if t]
    check_sizes(args)
    check_chat(args)
    if args.out and os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a directory; give the path of the JSON file to write")
    rows = load_rows(args.data, "--data")
    if args.limit:
        rows = rows.select(range(min(args.limit, len(rows))))
    check_columns(rows, args.data, list(dict.fromkeys(template_fields(prompt) + targets)))
    model, params, tokenizer = load(args.model, args.adapter, args.dtype)
    if args.label:
        result = evaluate_classification(model, params, tokenizer, rows, prompt, args.label, args.data,
                                         read_labels(args.adapter or args.model), args.batch_size)
    else:
        result = evaluate_generation(model, params, tokenizer, rows, prompt, targets, args.max_new_tokens,
                                     args.batch_size, args.chat, args.system)
    text = json.dumps(result)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


def cmd_generate(args) -> None:
    from jpeft.data.chat import generation_prompts
    from jpeft.generate import generate_text
    check_chat(args)
    model, params, tokenizer = load(args.model, args.adapter, args.dtype)
    temperature = args.temperature
    if temperature is None:  # --top-k / --top-p alone ask for sampling
        temperature = 1.0 if args.top_k or args.top_p < 1 else 0.0
    prompt = unescape(args.prompt)
    if args.chat:
        [prompt] = generation_prompts([prompt], tokenizer, args.system)
    [text] = generate_text(model, params, tokenizer, [prompt], args.max_new_tokens,
                           temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)


def cmd_merge(args) -> None:
    import jpeft
    from jpeft.errors import ConfigError
    for flag, source in (("--model", args.model), ("--adapter", args.adapter)):
        if os.path.exists(args.out) and os.path.samefile(args.out, source):
            raise ConfigError(f"--out {args.out} is the {flag} directory: merging there would overwrite what it "
                              "reads; give a new directory")
    model, params, _ = load(args.model, args.adapter, args.dtype)
    hf = model.config.hf_config  # merged in float32, written in the base's own dtype (as merge_and_unload keeps it)
    stored = args.dtype if args.dtype in ("float32", "bfloat16") else hf.get("dtype") or hf.get("torch_dtype")
    jpeft.save_pretrained(args.out, model, jpeft.merge(params), tokenizer_from=args.model, dtype=stored or "float32")
    print(f"merged model written to {args.out}")


def cmd_info(args) -> None:
    import jpeft
    if args.methods:
        from jpeft.config import method_options
        from jpeft.peft.registry import BY_NAME
        for name in BY_NAME:
            print(f"{name}: {', '.join(f'method.{o}' for o in method_options(name)) or '(no options)'}")
        return
    if not args.model:
        raise jpeft.ConfigError("info needs --model DIR (or --methods)")
    model, params, _ = load(args.model, args.adapter)
    cfg = model.config
    layers = (f"{cfg.num_layers} encoder + {cfg.num_decoder_layers} decoder layers" if cfg.is_encoder_decoder
              else f"{cfg.num_layers} layers")
    positions = {"t5": f"{cfg.relative_buckets} relative-position buckets",
                 "gpt2": "learned positions"}.get(cfg.model_type, f"rope {cfg.rope.type}")
    print(f"architecture: {cfg.model_type} · {layers} · hidden {cfg.hidden_size} · "
          f"heads {cfg.num_heads} (kv {cfg.num_kv_heads}) · mlp {cfg.intermediate_size} · "
          f"vocab {cfg.vocab_size} · tied embeddings {cfg.tie_word_embeddings} · {positions}")
    print(jpeft.parameter_report(params))


def cmd_bench(args) -> None:
    from jpeft import bench
    bench.main(args)


def cmd_plot(args) -> None:
    from jpeft.plot import plot_run
    print("\n".join(plot_run(args.run_dir, args.out)))


def cmd_compare(args) -> None:
    from jpeft.compare import compare, format_markdown
    table = compare(args.run_dirs, args.out, args.baseline)
    print(json.dumps(table) if args.json else format_markdown(table))


def cmd_forgetting(args) -> None:
    from jpeft.forgetting import format_report, read_probes, report, tuned_params
    check_sizes(args)
    probes = read_probes(args.probe, "--probe", args.limit)
    model, base, tokenizer = load(args.model, None, args.dtype)
    tuned = tuned_params(base, args.adapter, args.finetuned, args.dtype)
    result = report(model, base, tuned, tokenizer, probes, seq_len=args.seq_len, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens)
    print(json.dumps(result) if args.json else format_report(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jpeft", description="Fine-tune Hugging Face checkpoints (Llama, Mistral, Qwen2/3, Gemma 1-3, GPT-2, "
                                  "T5/FLAN-T5) with JAX: full, LoRA and its variants, QLoRA, IA3, BitFit, norm "
                                  "tuning, prompt and prefix tuning, LLaMA-Adapter, bottleneck adapters, classifier "
                                  "heads; evaluate, generate, merge, benchmark, measure forgetting.",
        epilog="Every command has --help with an example. Start with: jpeft demo")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level, and show the traceback of a file-system error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text.replace("%%", "%"),  # not %-formatted
                           epilog=f"example:\n  {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log at INFO level, and show the traceback of a file-system error")
        return p

    p = command("demo", cmd_demo, "Offline end to end: train a tokenizer and a small Llama on DialogSum, "
                "fine-tune it (full and LoRA, or --methods) to summarize, score them against the base.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--data", default=None, help="DialogSum-shaped JSONL (default: the 500-dialogue sample shipped with jpeft)")
    p.add_argument("--preset", default="default", choices=["default", "tiny"],
                   help="tiny: a seconds-long smoke run (used by the tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="full,lora",
                   help="comma-separated method names trained on the same base under one step budget, "
                        "or all (every method the --family takes); default full,lora")
    p.add_argument("--family", default="llama", choices=["llama", "t5"],
                   help="the base to build: llama (a decoder, default) or t5 (an encoder-decoder with FLAN-T5's "
                        "architecture, pre-trained as a prefix LM); t5 takes every method but llama_adapter and "
                        "classifier")
    p.add_argument("--replay", action="store_true",
                   help="also fine-tune each summarizing method with replay (a mixture in which 20%% of the examples "
                        "are the base's own pre-training task) and show what it does to forgetting")

    p = command("train", cmd_train, "Train as a YAML config says; key=value pairs override it. "
                "SIGTERM (preemption) or Ctrl-C checkpoints at the next step and exits 0; re-running on the "
                "same out_dir resumes.")
    p.add_argument("config", nargs="?", help="YAML config file (optional when everything is overridden)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=1e-4")

    def model_args(p, adapter=True, required=True,
                   dtype="weight and compute dtype on load (auto: bfloat16 where matmuls in it are native)"):
        p.add_argument("--model", required=required, help="HF model directory")
        if adapter:
            p.add_argument("--adapter", help="HF PEFT adapter directory (optional)")
        p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None, help=dtype)

    def chat_args(p):
        p.add_argument("--chat", action="store_true",
                       help="the prompt is the user's message in the tokenizer's chat template, opened for the "
                            "assistant's reply (a model tuned with data.chat)")
        p.add_argument("--system", help="with --chat: a system message before it")

    p = command("eval", cmd_eval, "Generate greedily for each row and score ROUGE-1/2/L/Lsum and BLEU "
                "against one or more reference columns; or, with --label, score a classifier's accuracy and "
                "macro-F1.")
    model_args(p)
    p.add_argument("--data", required=True, help="JSONL / CSV / parquet file or a `datasets` dir")
    p.add_argument("--prompt", required=True, help=r"template with {column} placeholders; \n means newline")
    scored = p.add_mutually_exclusive_group(required=True)
    scored.add_argument("--target", help="reference column(s), comma-separated")
    scored.add_argument("--label", help="the label column, for a classifier (its --adapter, or an exported "
                                        "classifier as --model)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy output length (default 64)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows (default 0: all)")
    p.add_argument("--batch-size", type=int, default=16, help="rows generated or scored at once (default 16)")
    p.add_argument("--out", help="also write the JSON result here")
    chat_args(p)

    p = command("generate", cmd_generate, "Continue a prompt with the model (and adapter).")
    model_args(p)
    p.add_argument("--prompt", required=True, help=r"the text to continue; \n means newline")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; above 0, sample (default: 1 with --top-k or --top-p, else 0)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens only (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches p (default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    chat_args(p)

    p = command("merge", cmd_merge, "Fold an adapter into the base: an HF dir transformers loads as-is.")
    model_args(p, dtype="dtype to load, merge and write in (default: merge in float32 and write the base's own "
                        "dtype, config.json's)")
    p.add_argument("--out", required=True, help="output HF model directory")

    p = command("info", cmd_info, "Architecture and parameter counts (trainable %% with an adapter), "
                "or with --methods every method name and its options.")
    model_args(p, required=False)
    p.add_argument("--methods", action="store_true", help="list every method.name and its method.* options")

    p = command("plan", cmd_plan, "Per-device memory of a training config (frozen and trainable params, "
                "gradients, optimizer state, activations) from the model's config.json alone, and the largest "
                "train.batch_size that fits a device.")
    p.add_argument("config", nargs="?", help="YAML config file (optional when everything is overridden)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.batch_size=16 mesh.fsdp=8")
    p.add_argument("--devices", type=int, default=None,
                   help="devices of the mesh, resolving a -1 mesh axis (default: the local JAX devices)")
    p.add_argument("--device-memory", metavar="SIZE",
                   help="memory of one device, e.g. 16GiB, 95GB or 80e9: also print the largest batch that fits")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")

    p = command("bench", cmd_bench, "Train-step throughput, compile time and peak memory of jpeft "
                "(LoRA and full), optionally against HF PEFT in PyTorch.")
    from jpeft import bench
    bench.add_arguments(p)

    p = command("plot", cmd_plot, "PNGs of a run's loss, learning rate, gradient norm and eval metrics "
                "(from its metrics.jsonl; works while the run is going).")
    p.add_argument("run_dir", help="the out_dir of a jpeft train run")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")

    p = command("compare", cmd_compare, "One table of finished runs (their summary.json): trainable parameters, "
                "held-out NLL, ROUGE/BLEU or accuracy/macro-F1, change vs a baseline, train time, peak memory; "
                "printed as markdown and written to comparison.md, comparison.json and comparison.png.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="out_dirs of finished jpeft train runs")
    p.add_argument("--out", default=".", help="where to write comparison.md/json/png (default: current dir)")
    p.add_argument("--baseline", metavar="RUN_DIR_OR_NAME",
                   help="the run the delta columns subtract (default: no delta columns)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object instead")

    p = command("forgetting", cmd_forgetting, "How much a fine-tune lost of what its base could do: each probe "
                "file scored on the base and on the fine-tuned model, and the relative change (tuned - base) / base. "
                "Rows with a 'text' column are scored by perplexity; rows with 'prompt' and 'target' columns by "
                "ROUGE-L of greedy outputs (FILE:accuracy: exact match; FILE:perplexity: the target's given the "
                "prompt).")
    model_args(p, adapter=False)
    tuned = p.add_mutually_exclusive_group(required=True)
    tuned.add_argument("--adapter", help="HF PEFT adapter directory trained on --model")
    tuned.add_argument("--finetuned", metavar="DIR", help="a fully fine-tuned HF model directory of --model")
    p.add_argument("--probe", nargs="+", required=True, metavar="FILE[:METRIC]",
                   help="probe data files (JSONL / JSON / CSV / parquet or a `datasets` dir); METRIC: perplexity, "
                        "rougeL or accuracy (default: perplexity for text rows, rougeL for prompt/target rows)")
    p.add_argument("--json", action="store_true",
                   help='print {"probes": {FILE: {"metric", "base", "tuned", "change"}}} instead of a table')
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows of each probe")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy output length for ROUGE-L and accuracy")
    p.add_argument("--batch-size", type=int, default=16, help="rows scored at once (default 16)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="cut each perplexity row to this many tokens (default: the model's positions, at most 1024)")
    return parser


def _no_pytorch_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]  # key=value pairs after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose or args.command in ("train", "demo"):
        logging.getLogger("jpeft").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jpeft import jax_env
    jax_env.apply()
    # jpeft needs no PyTorch, so transformers' import-time "PyTorch was not found" notice (a warning on
    # its "transformers" logger) is noise here; drop that one message before anything imports transformers.
    logging.getLogger("transformers").addFilter(_no_pytorch_notice)
    from jpeft.errors import JpeftError
    try:
        args.fn(args)
    except JpeftError as e:
        print(f"jpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a run's loop, or a command without one: nothing to save
        print(f"jpeft {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `jpeft info --methods | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
    except OSError as e:  # a path the command cannot write (a file where a directory goes, no permission, disk full)
        if args.verbose:
            raise
        problem = e.strerror or e
        if isinstance(e, FileExistsError) and e.filename and os.path.isfile(e.filename):
            problem = "a file is where a directory goes"
        print(f"jpeft {args.command}: error: {problem}{f': {e.filename}' if e.filename else ''} "
              "(--verbose shows where)", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """The console script: re-exec once under `jpeft.allocator`'s malloc settings (they must be in the
    environment before the process starts: 1.2-1.6x faster train steps on CPU, no fragmented heap),
    unless the user chose malloc settings of their own."""
    from jpeft import allocator
    if sys.platform.startswith("linux") and not allocator.user_tuned(os.environ):
        os.execve(sys.executable, [sys.executable, "-m", "jpeft.cli", *sys.argv[1:]],
                  {**os.environ, **allocator.tuned(os.environ)})
    sys.exit(main())


if __name__ == "__main__":
    entry()
