"""The `jpeft` command: its parser, and the entry point that runs a subcommand (`jpeft.commands`) under
jpeft's JAX and allocator settings, turning errors into one line each."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from jpeft import commands

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jpeft", description="Fine-tune Hugging Face checkpoints (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi, OPT, "
                                  "BLOOM, Falcon, GPT-2, T5/FLAN-T5 and more: `jpeft info --families`) with JAX: "
                                  "full, LoRA and its variants, VeRA, LoHa, LoKr, OFT, HRA, RoAd, QLoRA, IA3, BitFit, "
                                  "norm tuning, prompt tuning, P-tuning, prefix tuning, LLaMA-Adapter, bottleneck "
                                  "adapters, classifier heads; evaluate, generate, merge, benchmark, measure "
                                  "forgetting.",
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

    p = command("demo", commands.cmd_demo, "Offline end to end: train a tokenizer and a small Llama on DialogSum, "
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

    p = command("train", commands.cmd_train, "Train as a YAML config says; key=value pairs override it. "
                "SIGTERM (preemption) or Ctrl-C checkpoints at the next step and exits 0; re-running on the "
                "same out_dir resumes.")
    p.add_argument("config", nargs="?", help="YAML config file (optional when everything is overridden)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=1e-4")

    def model_args(p, adapter="optional", required=True,
                   dtype="weight and compute dtype on load (auto: bfloat16 where matmuls in it are native)"):
        """--model, --adapter ("optional", "required" or None: none) and --dtype."""
        p.add_argument("--model", required=required, help="HF model directory")
        if adapter:
            p.add_argument("--adapter", required=adapter == "required", help=f"HF PEFT adapter directory ({adapter})")
        p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None, help=dtype)

    def chat_args(p):
        p.add_argument("--chat", action="store_true",
                       help="the prompt is the user's message in the tokenizer's chat template, opened for the "
                            "assistant's reply (a model tuned with data.chat)")
        p.add_argument("--system", help="with --chat: a system message before it")

    p = command("eval", commands.cmd_eval, "Generate greedily for each row and score ROUGE-1/2/L/Lsum and BLEU "
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

    p = command("generate", commands.cmd_generate, "Continue a prompt with the model (and adapter).")
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

    p = command("merge", commands.cmd_merge, "Fold an adapter into the base: an HF dir transformers loads as-is.")
    model_args(p, adapter="required",
               dtype="dtype to load, merge and write in (auto: bfloat16 where matmuls in it are native; default: "
                     "merge in float32 and write the base's own dtype, config.json's)")
    p.add_argument("--out", required=True, help="output HF model directory")

    p = command("info", commands.cmd_info, "Architecture and parameter counts (trainable %% with an adapter), "
                "or with --methods every method name and its options, or with --families every model family.")
    model_args(p, required=False)
    p.add_argument("--methods", action="store_true", help="list every method.name and its method.* options")
    p.add_argument("--families", action="store_true", help="list every config.json model_type jpeft reads")

    p = command("plan", commands.cmd_plan, "Per-device memory of a training config (frozen and trainable params, "
                "gradients, optimizer state, activations) from the model's config.json alone, and the largest "
                "train.batch_size that fits a device.")
    p.add_argument("config", nargs="?", help="YAML config file (optional when everything is overridden)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.batch_size=16 mesh.fsdp=8")
    p.add_argument("--devices", type=int, default=None,
                   help="devices of the mesh, resolving a -1 mesh axis (default: the local JAX devices)")
    p.add_argument("--device-memory", metavar="SIZE",
                   help="memory of one device, e.g. 16GiB, 95GB or 80e9: also print the largest batch that fits")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")

    p = command("bench", commands.cmd_bench, "Train-step throughput, compile time and peak memory of jpeft "
                "(LoRA and full), optionally against HF PEFT in PyTorch.")
    from jpeft import bench
    bench.add_arguments(p)

    p = command("plot", commands.cmd_plot, "PNGs of a run's loss, learning rate, gradient norm and eval metrics "
                "(from its metrics.jsonl; works while the run is going).")
    p.add_argument("run_dir", help="the out_dir of a jpeft train run")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")

    p = command("compare", commands.cmd_compare, "One table of finished runs (their summary.json): trainable parameters, "
                "held-out NLL, ROUGE/BLEU or accuracy/macro-F1, change vs a baseline, train time, peak memory; "
                "printed as markdown and written to comparison.md, comparison.json and comparison.png.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="out_dirs of finished jpeft train runs")
    p.add_argument("--out", default=".", help="where to write comparison.md/json/png (default: current dir)")
    p.add_argument("--baseline", metavar="RUN_DIR_OR_NAME",
                   help="the run the delta columns subtract (default: no delta columns)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object instead")

    p = command("forgetting", commands.cmd_forgetting, "How much a fine-tune lost of what its base could do: each probe "
                "file scored on the base and on the fine-tuned model, and the relative change (tuned - base) / base. "
                "Rows with a 'text' column are scored by perplexity; rows with 'prompt' and 'target' columns by "
                "ROUGE-L of greedy outputs (FILE:accuracy: exact match; FILE:perplexity: the target's given the "
                "prompt).")
    model_args(p, adapter=None)
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
    from jpeft.errors import JpeftError, Stopped
    try:
        args.fn(args)
    except JpeftError as e:
        print(f"jpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # the shell's codes for a job ended by SIGINT / SIGTERM
        print(f"jpeft {args.command}: {e}", file=sys.stderr)
        return 130 if e.signal == "SIGINT" else 143
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
