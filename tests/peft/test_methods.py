"""The method protocol: for every method, identity at init, count = formula, only its own leaves
change when trained, merged = unmerged, and `jpeft.freeze` for users' own training loops."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import jpeft
from jpeft import tree as T
from jpeft.train.step import token_loss
from conftest import jit_logits, perturb

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 10)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import make_hf_model, save_hf_model
    return jpeft.from_pretrained(save_hf_model(make_hf_model("llama", attention_bias=False),
                                               tmp_path_factory.mktemp("base")))


def dims(cfg):
    kv = cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim), "k_proj": (cfg.hidden_size, kv),
            "v_proj": (cfg.hidden_size, kv), "o_proj": (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
            "gate_proj": (cfg.hidden_size, cfg.intermediate_size), "up_proj": (cfg.hidden_size, cfg.intermediate_size),
            "down_proj": (cfg.intermediate_size, cfg.hidden_size), "lm_head": (cfg.hidden_size, cfg.vocab_size),
            "embed_tokens": (cfg.vocab_size, cfg.hidden_size)}


def formula(name, cfg):
    """Trainable parameters by each method's documented formula (PEFT's where PEFT has it)."""
    d, L = dims(cfg), cfg.num_layers
    return {
        "lora": L * 4 * sum(d[m][0] + d[m][1] for m in ("q_proj", "v_proj")),
        "dora": L * sum(4 * (d[m][0] + d[m][1]) + d[m][1] for m in ("q_proj", "down_proj")),
        "lora-layers": 1 * 4 * (d["up_proj"][0] + d["up_proj"][1]),
        "lora-embed-head": 4 * sum(d[m][0] + d[m][1] for m in ("embed_tokens", "lm_head")),
        # the embedding's magnitude: one per embedding dimension (hidden), as PEFT's
        "dora-embed": 4 * sum(d["embed_tokens"]) + cfg.hidden_size + L * (4 * sum(d["v_proj"]) + d["v_proj"][1]),
        "ia3": L * (d["k_proj"][1] + d["v_proj"][1] + d["down_proj"][0]),
        "bitfit": L * sum(d[m][1] for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")),
        "norm": (2 * L + 1) * cfg.hidden_size,
        "prompt-tasks": 2 * 5 * cfg.hidden_size,
        "prefix": L * 2 * 5 * d["k_proj"][1],
        "prefix-projection": 5 * d["k_proj"][1] + (d["k_proj"][1] + 1) * 8 + L * (8 + 1) * 2 * d["k_proj"][1],
        "llama-adapter": 1 * (4 * cfg.hidden_size + 1),
        "bottleneck": L * 2 * (2 * cfg.hidden_size * 8 + 8 + cfg.hidden_size),
        "full": None,
    }[name]


METHODS = {
    "lora": lambda: jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj"]),
    "dora": lambda: jpeft.LoRA(rank=4, alpha=8, targets=["q_proj", "down_proj"], use_dora=True),
    "lora-layers": lambda: jpeft.LoRA(rank=4, alpha=8, targets=["up_proj"], layers=[1]),
    "lora-embed-head": lambda: jpeft.LoRA(rank=4, alpha=8, targets=["embed_tokens", "lm_head"]),
    "dora-embed": lambda: jpeft.LoRA(rank=4, alpha=8, targets=["embed_tokens", "v_proj"], use_dora=True),
    "ia3": lambda: jpeft.IA3(),
    "bitfit": lambda: jpeft.BitFit(),
    "norm": lambda: jpeft.NormTuning(),
    "prompt-tasks": lambda: jpeft.PromptTuning(5, tasks=2),
    "prefix": lambda: jpeft.PrefixTuning(5),
    "prefix-projection": lambda: jpeft.PrefixTuning(5, projection=8),
    "llama-adapter": lambda: jpeft.LlamaAdapter(4, 1),
    "bottleneck": lambda: jpeft.Bottleneck("houlsby", 8),
    "full": lambda: jpeft.Full(),
}
VIRTUAL_TOKENS = ("prompt-tasks", "prefix", "prefix-projection")  # change the output by design


@pytest.mark.parametrize("name", METHODS)
def test_identity_at_init_and_count_formula(base, name):
    model, params = base
    method = METHODS[name]()
    adapted = method.init(jax.random.key(0), params)
    if name not in VIRTUAL_TOKENS:
        np.testing.assert_allclose(jit_logits(model, adapted, IDS), jit_logits(model, params, IDS),
                                   atol=1e-6, rtol=0)
    trainable, total = jpeft.count_parameters(adapted, method.mask(adapted))
    expected = formula(name, model.config)
    assert trainable == (T.count(params) if expected is None else expected)
    added = 0 if name in ("norm", "full") else expected
    assert total == T.count(params) + added


def train_steps(model, params, mask, steps=3):
    """A few AdamW steps on the trainable partition, as the trainer does."""
    trainable, frozen = T.partition(params, mask)
    tx = optax.adam(1e-2)
    state = tx.init(trainable)
    batch = {"input_ids": IDS, "attention_mask": jnp.ones_like(IDS), "labels": jnp.roll(IDS, -1, axis=1),
             "loss_mask": jnp.ones(IDS.shape, jnp.float32)}

    @jax.jit
    def step(trainable, state):
        grads = jax.grad(lambda tr: token_loss(model, T.combine(tr, frozen), batch)[0])(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    for _ in range(steps):
        trainable, state = step(trainable, state)
    return T.combine(trainable, frozen)


@pytest.fixture(scope="module")
def train_once(base):
    """name -> (the method's tree at init, a copy of its leaves taken before training, the tree after
    `train_steps`): each method trained once, for every test here that reads the result."""
    runs = {}

    def get(name):
        if name not in runs:
            model, params = base
            method = METHODS[name]()
            adapted = method.init(jax.random.key(0), params)
            if name == "prompt-tasks":  # one prompt per row
                adapted = jpeft.select_task(adapted, [1, 0])
            before = {p: np.array(v) for p, v in T.flatten(adapted).items()}  # a copy, taken before training
            runs[name] = adapted, before, train_steps(model, adapted, method.mask(adapted))
        return runs[name]
    return get


@pytest.mark.parametrize("name", METHODS)
def test_training_changes_only_the_methods_leaves(train_once, name):
    adapted, before, after = train_once(name)
    trained = T.flatten(after)
    mask = T.flatten(METHODS[name]().mask(adapted))
    assert before.keys() == trained.keys()
    changed = {p for p in before if not np.array_equal(before[p], np.asarray(trained[p]))}
    assert changed and changed <= {p for p, m in mask.items() if m}
    if name == "lora-layers":  # the layer that is not adapted keeps its (inactive) factors untouched
        b = trained["model/layers/mlp/up_proj/lora_b"]
        assert not np.any(np.asarray(b[0])) and np.any(np.asarray(b[1]))


@pytest.mark.parametrize("name", ["lora", "dora", "dora-embed", "lora-layers", "lora-embed-head", "ia3"])
def test_merged_equals_unmerged(base, train_once, name):
    model, params = base
    _, _, trained = train_once(name)
    unmerged = jit_logits(model, trained, IDS)
    merged_params = jpeft.merge(trained)
    assert T.flatten(merged_params).keys() == T.flatten(params).keys()
    assert np.abs(np.asarray(unmerged - jit_logits(model, params, IDS))).max() > 1e-3
    np.testing.assert_allclose(jit_logits(model, merged_params, IDS), unmerged, atol=2e-5, rtol=0)


def test_lora_and_ia3_on_one_module_merge_exactly(base):
    """IA3 scales the input (feedforward) or output of the whole W + s·A·B: merge folds LoRA in first."""
    model, params = base
    adapted = jpeft.LoRA(rank=4, targets=["k_proj", "down_proj"]).init(jax.random.key(0), params)
    adapted = jpeft.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]).init(None, adapted)
    adapted = perturb(adapted, ("lora_b", "ia3_in", "ia3_out"), scale=0.3)
    unmerged = jit_logits(model, adapted, IDS)
    np.testing.assert_allclose(jit_logits(model, jpeft.merge(adapted), IDS), unmerged, atol=2e-5, rtol=0)


def test_norm_tuning_trains_gpt2s_layer_norm_scales(tmp_path):
    from conftest import GPT2, make_hf_model, save_hf_model
    _, params = jpeft.from_pretrained(save_hf_model(make_hf_model("gpt2", **GPT2), tmp_path))
    trained = {p for p, m in T.flatten(jpeft.NormTuning().mask(params)).items() if m}
    assert trained == {"transformer/h/ln_1/scale", "transformer/h/ln_2/scale", "transformer/ln_f/scale"}
    layers, hidden = params["transformer"]["h"]["ln_1"]["scale"].shape
    assert jpeft.count_parameters(params, jpeft.NormTuning().mask(params))[0] == (2 * layers + 1) * hidden


def test_freeze_updates_only_trainable_leaves_and_keeps_no_state_for_the_rest(base):
    model, params = base
    adapted = jpeft.LoRA(rank=4, targets=["q_proj", "v_proj"]).init(jax.random.key(0), params)
    before = {p: np.array(v) for p, v in T.flatten(adapted).items()}
    tx = jpeft.freeze(optax.adam(1e-2), adapted)
    state = tx.init(adapted)
    state_leaves = [x for x in jax.tree.leaves(state) if np.ndim(x) >= 1]
    n_trainable = sum(np.size(v) for p, v in before.items() if T.leaf_name(p) in ("lora_a", "lora_b"))
    assert sum(np.size(x) for x in state_leaves) == 2 * n_trainable  # adam's mu and nu, trainable only
    batch = {"input_ids": IDS, "attention_mask": jnp.ones_like(IDS), "labels": jnp.roll(IDS, -1, axis=1),
             "loss_mask": jnp.ones(IDS.shape, jnp.float32)}
    current = adapted
    for _ in range(2):  # the user's own loop: gradients of the whole tree
        grads = jax.grad(lambda p: token_loss(model, p, batch)[0])(current)
        updates, state = tx.update(grads, state, current)
        current = optax.apply_updates(current, updates)
    for path, value in T.flatten(current).items():
        same = np.array_equal(before[path], np.asarray(value))
        assert same == (T.leaf_name(path) not in ("lora_a", "lora_b")), path


def test_freeze_takes_a_qlora_tree_and_refuses_a_mask_of_another_tree(base):
    """A QLoRA tree's integer codes get float0 gradients (jax.grad(..., allow_int=True)): their zero updates
    keep the codes' dtype. A mask computed before init (no entry for the new leaves) is an error naming them."""
    model, params = base
    qlora = jpeft.QLoRA(rank=4, targets=["q_proj", "v_proj"]).init(jax.random.key(0), params)
    tx = jpeft.freeze(optax.adamw(1e-2), qlora)
    batch = {"input_ids": IDS, "attention_mask": jnp.ones_like(IDS), "labels": jnp.roll(IDS, -1, axis=1),
             "loss_mask": jnp.ones(IDS.shape, jnp.float32)}
    grads = jax.grad(lambda p: token_loss(model, p, batch)[0], allow_int=True)(qlora)
    updates, _ = tx.update(grads, tx.init(qlora), qlora)
    stepped = T.flatten(optax.apply_updates(qlora, updates))
    for path, value in T.flatten(qlora).items():
        assert stepped[path].dtype == value.dtype
        assert np.array_equal(stepped[path], value) == (T.leaf_name(path) not in ("lora_a", "lora_b")), path
    stale = jpeft.BitFit().mask(params)
    adapted = jpeft.BitFit().init(jax.random.key(0), params)
    for call in (lambda: jpeft.freeze(optax.adam(1e-2), adapted, stale),
                 lambda: jpeft.count_parameters(adapted, stale)):
        with pytest.raises(jpeft.JpeftError, match="the mask does not fit this tree \\(no entry for .*/bias"):
            call()


def test_freeze_without_a_trainable_leaf_names_the_mask_to_pass(base):
    _, params = base
    with pytest.raises(jpeft.JpeftError, match="no leaf of this tree is trainable.*method.mask\\(params\\)"):
        jpeft.freeze(optax.adam(1e-2), params)  # BitFit/NormTuning/Full train base leaves: the default mask has none
    jpeft.freeze(optax.adam(1e-2), params, jpeft.NormTuning().mask(params))


def test_a_second_init_of_a_method_refuses_to_replace_its_adapter(base):
    """LoRA then IA3 on one module is allowed (above); LoRA twice would silently drop the first (trained) one."""
    _, params = base
    for method in (jpeft.LoRA(rank=4, targets=["q_proj", "v_proj"]), jpeft.IA3(targets=["v_proj"], feedforward=[])):
        adapted = method.init(jax.random.key(0), params)
        with pytest.raises(jpeft.JpeftError, match=r"self_attn.v_proj already holds a (LoRA|IA3) adapter; .*add_adapter"):
            type(method)(targets=["v_proj"], **({"feedforward": []} if isinstance(method, jpeft.IA3) else {})).init(
                jax.random.key(1), adapted)


def test_unknown_targets_and_partial_ia3_are_errors(base):
    _, params = base
    with pytest.raises(jpeft.JpeftError, match="match no dense layer; available: .*q_proj"):
        jpeft.LoRA(targets=["qkv"]).init(jax.random.key(0), params)
    with pytest.raises(jpeft.JpeftError, match="only some layers"):
        jpeft.IA3(targets=r"model\.layers\.0\.self_attn\.k_proj", feedforward=[]).init(jax.random.key(0), params)


def test_list_targets_are_not_regexes_but_a_string_is(base):
    """PEFT's rule, the same at init and at load: list entries match names or dotted suffixes."""
    _, params = base
    with pytest.raises(jpeft.JpeftError, match="match no dense layer"):
        jpeft.LoRA(targets=[".*_proj"]).init(jax.random.key(0), params)
    adapted = jpeft.LoRA(targets=r"model\.layers\.1\.self_attn\.q_proj").init(jax.random.key(0), params)
    assert np.asarray(adapted["model"]["layers"]["self_attn"]["q_proj"]["lora_scale"]).tolist() == [0.0, 2.0]


@pytest.mark.parametrize("name,peft_type", [("bitfit", "JPEFT"), ("norm", "LN_TUNING"), ("norm", "JPEFT")])
def test_methods_training_base_leaves_round_trip_through_an_adapter_dir(base, train_once, tmp_path, name, peft_type):
    """BitFit in jpeft's own dir; norm tuning in PEFT's LN tuning dir, and in jpeft's own as earlier versions
    wrote it."""
    from jpeft.peft import hf_format
    _, params = base
    _, _, trained = train_once(name)
    jpeft.save_adapter(str(tmp_path / "a"), trained, method=METHODS[name]())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    if config["peft_type"] != peft_type:  # norm tuning's earlier dir
        tensors, config = hf_format._native(trained, METHODS[name]())
        save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    assert config["peft_type"] == peft_type
    loaded = jpeft.load_adapter(str(tmp_path / "a"), params)
    flat, back = T.flatten(trained), T.flatten(loaded)
    assert flat.keys() == back.keys()
    for path in flat:
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(back[path]), err_msg=path)
