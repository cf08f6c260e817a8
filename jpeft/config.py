"""Typed run configuration: YAML file + dotted `key=value` overrides, checked with clear errors.

A run is described by one `RunConfig`, built from a YAML mapping of sections
(`model`, `method`, `data`, `train`, plus top-level `out_dir`) and then from command-line
overrides such as `train.lr=1e-4`. Every key is checked against the dataclasses below, so a
typo fails before any work starts, with the file/override that caused it named.

Parsing rules worth knowing:
- override values are parsed with `yaml.safe_load` (`train.steps=10` is an int,
  `method.targets=[q_proj,v_proj]` a list), except for string fields, which take the text
  verbatim (so `data.prompt=Summarize: {dialogue}` stays a string); `null` clears an
  optional string.
- float fields accept ints and numeric strings, because YAML 1.1 reads `2e-4` (no dot)
  as a string.
- list fields accept a comma-separated string: `method.targets=q_proj,v_proj`.
- `method.lora` (the LoRA a classifier trains with its head) maps LoRA's options, typed as their
  `method.*` keys: a YAML mapping or dotted overrides (`method.lora.rank=8`); a mapping replaces
  the whole of it, a dotted key sets one option. `jpeft.LoRA(**options)` checks them.

What types cannot say (choices, ranges, keys that go together) is checked in `jpeft.config_rules`.
"""
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from jpeft.errors import ConfigError


@dataclass
class ModelSection:
    path: str | None = None
    dtype: str = "auto"  # float32 | bfloat16 | auto: bfloat16 where matmuls in it are native (jpeft.hardware)
    remat: str = "none"  # rematerialise layer activations: none | full | dots
    dropout: bool = True  # the model's own dropout from config.json (GPT-2's, T5's) in training, as transformers
    # a mixture of experts' load-balancing loss weight in training; None: config.json's router_aux_loss_coef
    # where its output_router_logits is set, else 0
    router_aux_loss_coef: float | None = None


@dataclass
class MethodSection:
    """`name` picks the method; the other keys are its options (those it does not take are an error)."""
    name: str = "lora"
    rank: int | None = None  # None: the method's default (LoRA's 8, VeRA's 256, as in PEFT; OFT's block count)
    alpha: float | None = None  # None: the method's default (LoRA's 16; LoHa's and LoKr's 8, as in PEFT)
    targets: list[str] | None = None  # None: the method's default; a string with regex characters is a regex
    dropout: float = 0.0
    init: str = "peft"
    use_rslora: bool = False
    use_dora: bool = False
    layers: list[int] | None = None
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None
    lr_ratio: float = 1.0  # LoRA+: B's learning rate / A's
    lr_embedding: float | None = None  # LoRA+: the learning rate of a LoRA on an embedding (None: 1e-6)
    d_initial: float = 0.1  # VeRA: the start of its λ_d vector
    decompose_both: bool = False  # LoKr: W₁ a rank-r product too (where r is below half its larger side)
    decompose_factor: int = -1  # LoKr: split each width as (this, width / this) where it divides it (-1: near its root)
    block_size: int | None = None  # OFT: the rotation blocks' size (None: PEFT's 32, or width / method.rank)
    block_share: bool = False  # OFT: one rotation block for all blocks of a layer
    use_cayley_neumann: bool = True  # OFT: PEFT's truncated series for the Cayley transform (false: exact)
    num_cayley_neumann_terms: int = 5  # OFT: the series' terms
    gram_schmidt: bool = False  # HRA: orthonormalise the reflection vectors (PEFT's apply_GS)
    variant: str = "road_1"  # RoAd: road_1 | road_2 | road_4 (one, two or four parameters per output)
    group_size: int = 64  # RoAd: outputs are paired within groups of this many (PEFT's default)
    token_indices: list[int] | None = None  # trainable tokens: the token ids whose embedding rows train
    trainable_token_indices: list[int] | None = None  # LoRA: these ids' input-embedding rows train too (PEFT's)
    target_parameters: list[str] | None = None  # LoRA: a mixture's expert weights (PEFT's; mlp.experts.down_proj)
    bias: str = "none"  # LoRA: PEFT's bias, the base's biases trained too: none | all | lora_only
    quant: str = "nf4"  # QLoRA: nf4 | int8 | mxfp4
    double_quant: bool = False
    # QLoRA: a mixture's stacked experts quantized too, nf4 | int8 | mxfp4 (None: float, as bitsandbytes leaves them)
    expert_quant: str | None = None
    feedforward: list[str] | None = None
    num_virtual_tokens: int = 20  # prompt / prefix / P-tuning
    init_text: str | None = None  # prompt tuning: start from the embeddings of this text
    tasks: int = 1  # prompt tuning: soft prompts side by side, one per task
    projection: int | None = None  # prefix tuning, P-tuning: hidden size of the reparameterisation MLP (P-tuning: None is D)
    adapter_len: int = 10  # LLaMA-Adapter: prompt length per layer
    adapter_layers: int | None = None  # LLaMA-Adapter: the top this many layers (None: all)
    kind: str = "houlsby"  # bottleneck adapters: houlsby | pfeiffer | parallel
    size: int = 64  # bottleneck adapters: hidden units
    activation: str = "relu"  # bottleneck adapters: a key of jpeft.models.layers.ACTIVATIONS
    scale: float = 1.0  # parallel bottleneck adapters: the output scale s
    num_labels: int | None = None  # classifier: number of classes (None: those of data.label in data.train)
    pooling: str = "last"  # classifier: last (non-pad token, as HF) | mean
    hidden: int | None = None  # classifier: hidden units of an MLP head (None: a linear head, HF's)
    lora: dict | None = None  # classifier: LoRA trained with the head, LoRA's options (method.lora.rank=8)
    modules_to_save: list[str] | None = None  # PEFT's: modules trained whole beside the adapter, saved in its dir


@dataclass
class DataSection:
    train: str | None = None
    eval: str | None = None
    prompt: str | None = None
    target: str | None = None
    text: str | None = None
    label: str | None = None  # classification: the label column; data.prompt (or data.text) is the input
    packing: bool = True  # prompt/target rows: several examples per row, attention kept within each
    chat: bool = False  # rows (messages column, or prompt/target) through the chat template, loss on assistant turns
    system: str | None = None  # data.chat: the system message of rows that have none
    eval_limit: int = 64
    max_new_tokens: int = 64
    template: str | None = None  # a template set (configs/templates/NAME.yaml or a path): phrasings for prompt/target
    template_mode: str = "random"  # one phrasing per example: random (seeded) | cycle
    columns: dict | None = None  # template field -> the data's column, e.g. {text: dialogue}
    split: dict | None = None  # {train: 0.9, eval: 0.1} of data.train's rows, or named splits {train: train, eval: validation}
    mixture: list | None = None  # tasks mixed by weight: [{train, template | prompt+target | text, weight, cap, name}, ...]
    strict: bool = False  # a row that cannot be used is an error instead of dropped (and counted)


@dataclass
class TrainSection:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-4
    warmup: int = 10
    seed: int = 0
    grad_accum: int = 1
    save_every: int = 0  # 0 = save only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    eval_every: int = 0  # 0 = evaluate only at the end
    log_every: int = 10
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop naming the step, or skip the update (counted)


@dataclass
class MeshSection:
    """Device mesh axes; one of them may be -1: the devices the others leave."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class DistSection:
    """Multi-host start (`jax.distributed.initialize`); unset = automatic on TPU VMs / SLURM, else one process."""
    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class EvalSection:
    """What each evaluation measures besides data.eval."""
    forgetting: list[str] | None = None  # probe files (FILE or FILE:METRIC) scored on the base, then at each eval


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    dist: DistSection = field(default_factory=DistSection)
    eval: EvalSection = field(default_factory=EvalSection)
    out_dir: str = "runs/jpeft"


_SECTIONS = {"model": ModelSection, "method": MethodSection, "data": DataSection, "train": TrainSection,
             "mesh": MeshSection, "dist": DistSection, "eval": EvalSection}
MOVED = {"train.fsdp": "mesh.fsdp", "train.tensor": "mesh.tensor"}
_TOP_LEVEL = {"out_dir": str}
KEY_TYPES = {**_TOP_LEVEL, **{f"{section}.{f.name}": f.type for section, cls in _SECTIONS.items()
                           for f in dataclasses.fields(cls)}}

REGEX_CHARS = set("\\.*+?|()[]^$")
LORA_KEY = "method.lora"
SAVED_MODULES = "modules_to_save"


def method_options(name: str) -> list[str]:
    """The `method.*` keys a method takes: its constructor's parameters (jpeft.peft.registry)."""
    import inspect

    from jpeft.peft.registry import BY_NAME
    from jpeft.peft.hf_format import carries_saved_modules
    keys = [f.name for f in dataclasses.fields(MethodSection)]
    names = {p for c in BY_NAME[name].__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters}
    if carries_saved_modules(BY_NAME[name]):  # an option of the run, not of the method's constructor
        names.add(SAVED_MODULES)
    return [k for k in keys if k in names]


def method_kwargs(section: "MethodSection") -> dict:
    """The constructor's options of the configured method, set or defaulted, as keyword arguments."""
    return {k: v for k in method_options(section.name) if k != SAVED_MODULES and (v := getattr(section, k)) is not None}


def load_config(path: str | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at `path` (if any), then each `key=value` override."""
    values: dict[str, tuple[Any, str]] = {}  # dotted key -> (value, where it came from)
    if path is not None:
        for key, value in _flatten(_read_yaml(path), path).items():
            _put(values, key, value, path)
    for text in overrides:
        key, value = _parse_override(text)
        _put(values, key, value, f"override '{text}'")
    sections = {name: {} for name in _SECTIONS}
    top = {}
    for key, (value, origin) in values.items():
        section, _, name = key.rpartition(".")
        typed = coerce(value, _field_type(key, origin), key, origin)
        if section == LORA_KEY:
            sections["method"]["lora"] = {**(sections["method"].get("lora") or {}), name: typed}
        else:
            (sections[section] if section else top)[name] = typed
    cfg = RunConfig(**{name: cls(**sections[name]) for name, cls in _SECTIONS.items()}, **top)
    from jpeft.config_rules import check
    check(cfg, {key: origin for key, (_, origin) in values.items()})
    return cfg


def _put(values: dict, key: str, value: Any, origin: str) -> None:
    """values[key] = (value, origin), a `method.lora` mapping as one key per option (replacing any
    set before), so a later dotted `method.lora.rank=...` changes that option alone."""
    if key == LORA_KEY:
        for old in [k for k in values if k.startswith(LORA_KEY + ".")]:
            del values[old]
    values[key] = ({} if key == LORA_KEY and isinstance(value, dict) else value, origin)
    for name, item in (value.items() if key == LORA_KEY and isinstance(value, dict) else ()):
        values[f"{LORA_KEY}.{name}"] = (item, origin)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict, ready for `yaml.safe_dump` into `out_dir/config.yaml`."""
    return dataclasses.asdict(cfg)


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, but a key written twice in one mapping is an error: PyYAML keeps the last one,
    silently dropping the first (a second `train:` section would drop every key of the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"'{key}' appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found; pass the path of a YAML file "
                          "(see configs/ for examples)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, _UniqueKeys)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        context = getattr(e, "context_mark", None)
        if context is not None:
            problem = f"{problem} ({e.context} started at line {context.line + 1})"
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}; "
                          "check indentation, colons and quoting there") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of sections "
                          f"({', '.join(_SECTIONS)}), got {type(raw).__name__}")
    return raw


def _flatten(raw: dict, origin: str) -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}, rejecting unknown sections and keys."""
    flat = {}
    for top, value in raw.items():
        top = str(top)
        if top in _TOP_LEVEL:
            flat[top] = value
            continue
        if top not in _SECTIONS:
            _unknown(top, origin)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"section '{top}' in {origin} must be a mapping of keys, "
                              f"got {type(value).__name__} {value!r}")
        for name, item in value.items():
            key = f"{top}.{name}"
            _field_type(key, origin)
            flat[key] = item
    return flat


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like section.key=value, "
                          "e.g. train.lr=1e-4")
    origin = f"override '{text}'"
    tp = _field_type(key, origin)
    if _base_type(tp) is str:
        return key, None if raw.strip() in ("null", "~") else raw  # as in YAML (a key that needs a string refuses)
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of {origin}: {e}") from None


def _field_type(key: str, origin: str = "") -> Any:
    if key.startswith(LORA_KEY + "."):  # typed as LoRA's own method.* key; another name fails in _check_lora
        return KEY_TYPES.get("method." + key[len(LORA_KEY) + 1:], Any)
    if key not in KEY_TYPES:
        _unknown(key, origin)
    return KEY_TYPES[key]


def _unknown(key: str, origin: str) -> typing.NoReturn:
    where = f" in {origin}" if origin else ""
    if key in MOVED:
        raise ConfigError(f"config key '{key}'{where} has moved to '{MOVED[key]}' (the device mesh is its own "
                          f"section: mesh.data, mesh.fsdp, mesh.tensor)")
    if key in _SECTIONS:
        raise ConfigError(f"'{key}'{where} is a section, not a value; set one of its keys, "
                          f"e.g. {key}.{dataclasses.fields(_SECTIONS[key])[0].name}=...")
    section, _, name = key.partition(".")
    if section in _SECTIONS:
        valid = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        prefix, suffix, scope = f"{section}.", "", f"valid keys in '{section}'"
    else:
        name, valid, scope = section, [*_SECTIONS, *_TOP_LEVEL], "valid top-level keys"
        prefix, suffix = "", key[len(section):]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{prefix}{close[0]}{suffix}'?" if close else ";"
    raise ConfigError(f"unknown config key '{key}'{where}{hint} {scope}: {', '.join(valid)}")


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if _optional(tp) else tp


def coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """`value` as the field's type, or a ConfigError naming the key and expected type."""
    if tp is Any:
        return value
    if value is None and _optional(tp):
        return None
    base = _base_type(tp)
    if base is str and isinstance(value, str):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if base is bool and isinstance(value, bool):
        return value
    if base is dict and isinstance(value, dict):
        return dict(value)
    if base is list and isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return [dict(v) for v in value]
    if base == list[int]:
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
    if base == list[str]:
        if isinstance(value, str) and key in ("method.targets", f"{LORA_KEY}.targets") and any(
                c in value for c in REGEX_CHARS):
            return value  # PEFT: a single string is a full regex over module names
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    expected = {str: "a string (quote it in YAML)", int: "an integer", float: "a number",
                bool: "true or false", dict: "a mapping, e.g. {k_proj: 4}",
                list: "a list of mappings, e.g. [{train: a.jsonl, text: text}, {train: b.jsonl, text: text}]",
                list[int]: "a list of integers, e.g. [0, 2]",
                list[str]: "a list of strings, e.g. [q_proj, v_proj] or q_proj,v_proj"}[base]
    raise ConfigError(f"config key '{key}' in {origin} must be {expected}, "
                      f"got {type(value).__name__} {value!r}")
