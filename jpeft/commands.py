"""What each `jpeft` subcommand does with its parsed arguments: check them, call the library, print."""
from __future__ import annotations

import json
import os


def unescape(text: str) -> str:
    r"""Templates typed on a shell: `\n` and `\t` mean newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def load(model_dir: str, adapter_dir: str | None, dtype: str | None = None, tokenizer: bool = True):
    """(model, params, tokenizer) for a base HF dir plus an optional PEFT adapter dir; the tokenizer only where
    the command reads text (merge and info do not, and take a dir without tokenizer files)."""
    import jpeft
    from jpeft.models.hf import load_tokenizer

    model, params = jpeft.from_pretrained(model_dir, dtype=dtype)
    if adapter_dir:
        params = jpeft.load_adapter(adapter_dir, params)
    return model, params, load_tokenizer(model_dir) if tokenizer else None


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
    import logging

    from jpeft.data.chat import generation_prompts
    from jpeft.generate import generate_text
    from jpeft.models.generation_config import decoding_settings
    check_chat(args)
    model, params, tokenizer = load(args.model, args.adapter, args.dtype)
    if settings := decoding_settings(args.model):
        logging.getLogger("jpeft").warning(
            "%s/generation_config.json sets %s, which transformers' generate() applies by default; jpeft decodes "
            "as its own options say (greedy unless --temperature, --top-k or --top-p) and has no penalties, bans "
            "or minimum lengths", args.model, ", ".join(f"{k}={v}" for k, v in settings.items()))
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
    import logging

    import jpeft
    from jpeft import tree as T
    from jpeft.errors import ConfigError
    from jpeft.hardware import resolve_dtype
    from jpeft.peft.classifier import read_label_config
    for flag, source in (("--model", args.model), ("--adapter", args.adapter)):
        if os.path.exists(args.out) and os.path.exists(source) and os.path.samefile(args.out, source):
            raise ConfigError(f"--out {args.out} is the {flag} directory: merging there would overwrite what it "
                              "reads; give a new directory")
    if os.path.exists(os.path.join(args.out, "adapter_config.json")):
        raise ConfigError(f"--out {args.out} holds an adapter (adapter_config.json), which transformers would apply "
                          "on top of the merged weights; give a new directory")
    model, params, _ = load(args.model, args.adapter, args.dtype, tokenizer=False)
    embedding = model.embedding_path.rpartition("/")[0]
    if model.config.tie_word_embeddings and len(T.modules(params).get(embedding, {})) > 1:
        logging.getLogger("jpeft").warning(
            "%s adapts the token embedding, to which the LM head is tied: the merged model's head reads the adapted "
            "table, the unmerged model's the original one (PEFT's merge_and_unload does the same)", args.adapter)
    hf = model.config.hf_config  # merged in float32, written in the base's own dtype (as merge_and_unload keeps it)
    stored = resolve_dtype(args.dtype) if args.dtype else hf.get("dtype") or hf.get("torch_dtype")
    jpeft.save_pretrained(args.out, model, jpeft.merge(params), tokenizer_from=args.model, dtype=stored or "float32",
                          config=read_label_config(args.adapter))  # a classifier's class names and pad id
    print(f"merged model written to {args.out}")


def cmd_info(args) -> None:
    import jpeft
    if args.methods:
        from jpeft.config import method_options
        from jpeft.peft.registry import BY_NAME
        for name in BY_NAME:
            print(f"{name}: {', '.join(f'method.{o}' for o in method_options(name)) or '(no options)'}")
        return
    if args.families:
        from jpeft.models.families import SUPPORTED_TYPES
        print("\n".join(SUPPORTED_TYPES))
        return
    if not args.model:
        raise jpeft.ConfigError("info needs --model DIR (or --methods, or --families)")
    from jpeft.peft.hf_format import adapter_mask
    model, params, _ = load(args.model, args.adapter, tokenizer=False)
    cfg = model.config
    layers = (f"{cfg.num_layers} encoder + {cfg.num_decoder_layers} decoder layers" if cfg.is_encoder_decoder
              else f"{cfg.num_layers} layers")
    positions = (f"{cfg.relative_buckets} relative-position buckets" if cfg.model_type == "t5"
                 else "learned positions" if cfg.learned_positions else "ALiBi" if cfg.alibi
                 else f"rope {cfg.rope.type}")
    print(f"architecture: {cfg.model_type} · {layers} · hidden {cfg.hidden_size} · "
          f"heads {cfg.num_heads} (kv {cfg.num_kv_heads}) · mlp {cfg.intermediate_size} · "
          f"vocab {cfg.vocab_size} · tied embeddings {cfg.tie_word_embeddings} · {positions}")
    print(jpeft.parameter_report(params, adapter_mask(args.adapter, params) if args.adapter else None))


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
