"""Classification heads: they train, export to transformers / PEFT with the same logits, load back,
count as PEFT counts, and refuse what cannot work."""
import json

import datasets
import jax
import numpy as np
import peft
import pytest
import torch
import transformers
import yaml

import jpeft
from jpeft import tree as T
from jpeft.cli import main
from jpeft.config import load_config
from jpeft.data import check_last_not_pad, label_ids, label_names, tokenize_classification
from jpeft.evaluate import classification_metrics
from jpeft.peft.classifier import Classifier, split_head
from jpeft.train import trainer
from conftest import GPT2, WORDS, make_hf_model, make_tokenizer, save_hf_model
from test_peft_parity import perturb

LORA = {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
VOCAB = list(dict.fromkeys(WORDS))
# Each decoder family with a classifier: its tiny checkpoint's overrides, its toy fixture, the linear head's
# learning rate and the held-out accuracy it reaches on the toy task, the targets of the LoRA jpeft trains under
# the head and of one PyTorch PEFT writes, the class transformers loads the export as, and the base's top-level
# module in it. GPT-2's random features are harder to read (its learned positions are as large as its token
# embeddings): weights N(0, 0.2²) and a larger rate take its head to 0.9 in the same 80 steps.
FAMILIES = {"llama": dict(sizes={}, toy="toy", lr=5e-2, accuracy=0.95, lora=["q_proj", "v_proj"],
                          peft_lora=["k_proj"], architecture="LlamaForSequenceClassification", body="model"),
            "gpt2": dict(sizes={**GPT2, "initializer_range": 0.2}, toy="gpt2_toy", lr=5e-1, accuracy=0.9,
                         lora=["c_attn", "c_fc"], peft_lora=["c_proj"], architecture="GPT2ForSequenceClassification",
                         body="transformer")}


def toy_rows(n: int, seed: int) -> list[dict]:
    """Two token distributions: "pos" texts draw words from one half of the vocabulary, "neg" from the other."""
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        label = ("pos", "neg")[rng.randint(2)]
        half = VOCAB[:12] if label == "pos" else VOCAB[12:]
        rows.append({"text": " ".join(rng.choice(half, rng.randint(3, 9))), "label": label})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_toy(root, family: str = "llama") -> dict:
    """A tiny model of the family with a word-level tokenizer, and train/eval files of the toy task."""
    tokenizer = make_tokenizer()
    base = save_hf_model(make_hf_model(family, **FAMILIES[family]["sizes"], vocab_size=len(tokenizer),
                                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id), root / "base")
    tokenizer.save_pretrained(base)
    train_rows = toy_rows(128, seed=0)
    assert train_rows[0]["label"] == "pos"  # so "neg" = 0 shows the sorted order, not the first seen
    return {"root": root, "base": base, "tokenizer": tokenizer, "train": write_jsonl(root / "train.jsonl", train_rows),
            "eval": write_jsonl(root / "eval.jsonl", toy_rows(32, seed=1)), "family": family}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="module")
def gpt2_toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("classifier_gpt2"), "gpt2")


def toy_config(toy, out, *extra):
    return load_config(None, ["model.dtype=float32", f"model.path={toy['base']}", f"data.train={toy['train']}", f"data.eval={toy['eval']}",
                              "data.text=text", "data.label=label", "method.name=classifier", "train.steps=80",
                              "train.batch_size=8", "train.lr=5e-2", "train.warmup=2", "train.log_every=10",
                              f"out_dir={out}", *extra])


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request):
    """A linear head trained alone on each family (exported as an HF model dir): its toy, out dir and final metrics."""
    toy = request.getfixturevalue(FAMILIES[request.param]["toy"])
    out = toy["root"] / "run"
    return toy, out, trainer.train(toy_config(toy, out, f"train.lr={FAMILIES[request.param]['lr']}"), progress=False)


def padded(tokenizer, texts, side="right"):
    batch = tokenizer(texts, padding=True, padding_side=side, return_tensors="np")
    return batch["input_ids"], batch["attention_mask"]


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_head_trains_with_the_base_frozen_and_exports_an_hf_classifier(trained):
    """The head alone learns the toy task; the export is transformers' own classifier (Llama's or GPT-2's), with
    the base untouched."""
    toy, out, record = trained
    assert record["eval_accuracy"] >= FAMILIES[toy["family"]]["accuracy"]
    assert {"eval_loss", "eval_macro_f1"} <= record.keys()
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[toy["family"]]["architecture"]]
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["pad_token_id"] == toy["tokenizer"].pad_token_id
    model, params = jpeft.from_pretrained(str(out / "model"))
    _, base = jpeft.from_pretrained(toy["base"])
    body = FAMILIES[toy["family"]]["body"]
    assert set(params) == {body, "score"}  # HF's classifier: no LM head
    for path, value in T.flatten(base[body]).items():
        np.testing.assert_array_equal(np.asarray(T.flatten(params[body])[path]), np.asarray(value), err_msg=path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model", dtype=torch.float32).eval()
    texts = ["cat sat on mat", "hello world it is sunny today we go out", "dog ran"]
    for side in ("right", "left"):  # HF's last non-pad token is jpeft's last attended one either way
        ids, mask = padded(toy["tokenizer"], texts, side)
        np.testing.assert_allclose(np.asarray(jpeft.classify(model, params, ids, mask)), hf_logits(hf, ids, mask),
                                   atol=2e-4, rtol=0)


def test_jpeft_eval_scores_a_classifier_as_computed_by_hand(trained, tmp_path, capsys):
    """`jpeft eval --label` agrees with accuracy/macro-F1 computed from transformers' predictions."""
    toy = trained[0]
    rows = toy_rows(24, seed=2)
    for row in rows[:5]:  # wrong labels, so both classes have errors to score
        row["label"] = "pos" if row["label"] == "neg" else "neg"
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    out = trained[1] / "model"
    assert main(["eval", "--model", str(out), "--data", data, "--prompt", "{text}", "--label", "label"]) == 0
    result = json.loads(capsys.readouterr().out)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = padded(toy["tokenizer"], [r["text"] for r in rows])
    predicted = hf_logits(hf, ids, mask).argmax(-1)
    truth = np.array([r["label"] == "pos" for r in rows], int)
    f1 = [2 * np.sum((predicted == c) & (truth == c)) / (np.sum(predicted == c) + np.sum(truth == c)) for c in (0, 1)]
    assert result["n"] == 24 and result["accuracy"] == pytest.approx(np.mean(predicted == truth))
    assert result["macro_f1"] == pytest.approx(np.mean(f1)) and result["accuracy"] < 1
    rows[7]["label"] = "bird"
    write_jsonl(tmp_path / "test.jsonl", rows)
    assert main(["eval", "--model", str(out), "--data", data, "--prompt", "{text}", "--label", "label"]) == 2
    assert "row 8: label 'bird' is not one of the classifier's 2 classes (neg, pos)" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_run_exports_a_peft_dir_that_hf_loads_with_its_classifier_json(family, request, tmp_path):
    """A LoRA + head run's adapter dir is all PEFT needs: classifier.json holds the from_pretrained kwargs."""
    toy = request.getfixturevalue(FAMILIES[family]["toy"])
    targets = [] if family == "gpt2" else [f"method.lora.targets=[{','.join(FAMILIES[family]['lora'])}]"]  # GPT-2:
    trainer.train(toy_config(toy, tmp_path, "train.steps=3", "method.lora.rank=4", "method.lora.dropout=0.1",
                             *targets), progress=False)  # PEFT's default, c_attn
    adapter = tmp_path / "adapter"
    kwargs = json.loads((adapter / "classifier.json").read_text())
    assert kwargs["id2label"] == {"0": "neg", "1": "pos"} and not (tmp_path / "model").exists()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(toy["base"], dtype=torch.float32, **kwargs)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    model, params = jpeft.from_pretrained(toy["base"])
    ids, mask = padded(toy["tokenizer"], ["cat sat on mat", "dog ran to park and then home"])
    np.testing.assert_allclose(np.asarray(jpeft.classify(model, jpeft.load_adapter(str(adapter), params), ids, mask)),
                               hf_logits(peft_model, ids, mask), atol=2e-4, rtol=0)
    from jpeft.cli import main  # merged, the class names and pad id go into config.json
    assert main(["merge", "--model", toy["base"], "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["id2label"] == {"0": "neg", "1": "pos"} and merged["pad_token_id"] == kwargs["pad_token_id"]


def test_macro_f1_averages_the_classes_seen_in_labels_or_predictions():
    """scikit-learn's macro average: a class only predicted, or only labelled, counts with F1 0."""
    scores = classification_metrics([0, 1, 1, 1, 0], [0, 0, 1, 1, 2])  # F1: 1/2, 4/5, 0
    assert scores == {"accuracy": pytest.approx(0.6), "macro_f1": pytest.approx(1.3 / 3), "n": 5}


@pytest.fixture(params=FAMILIES)
def base(request, tmp_path):
    """(family, checkpoint dir, jpeft model, params) of a tiny model of each family; pad id 0 for HF's pooling."""
    path = save_hf_model(make_hf_model(request.param, **FAMILIES[request.param]["sizes"]), tmp_path / "base")
    return (request.param, path, *jpeft.from_pretrained(path))


IDS = np.random.RandomState(0).randint(1, 97, (3, 9))
MASK = (np.arange(9)[None] < np.array([[9], [5], [7]])).astype(np.int32)
IDS_PADDED = np.where(MASK, IDS, 0)


def hf_classifier(path, num_labels):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, pad_token_id=0, dtype=torch.float32)


def test_lora_head_saves_as_peft_seq_cls_and_loads_both_ways(base, tmp_path):
    """PEFT's SEQ_CLS layout (head as modules_to_save) both ways; any other modules_to_save stays refused."""
    family, path, model, params = base
    lora = {**LORA, "targets": FAMILIES[family]["lora"]}
    trained = perturb(jpeft.Classifier(3, lora=lora).init(jax.random.key(0), params), ("lora_b",), jax.random.key(1))
    logits = np.asarray(jpeft.classify(model, trained, IDS_PADDED, MASK))
    jpeft.save_adapter(str(tmp_path / "adapter"), trained)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier", "score", "pre_classifier"]
    peft_model = peft.PeftModel.from_pretrained(hf_classifier(path, 3), tmp_path / "adapter").eval()
    np.testing.assert_allclose(logits, hf_logits(peft_model, IDS_PADDED, MASK), atol=2e-4, rtol=0)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(np.asarray(jpeft.classify(model, reloaded, IDS_PADDED, MASK)), logits, atol=1e-6)
    # ... and a directory PEFT itself wrote
    written = peft.get_peft_model(hf_classifier(path, 3), peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                                          target_modules=FAMILIES[family]["peft_lora"],
                                                                          init_lora_weights=False)).eval()
    written.save_pretrained(tmp_path / "peft")
    from_peft = jpeft.load_adapter(str(tmp_path / "peft"), params)
    np.testing.assert_allclose(np.asarray(jpeft.classify(model, from_peft, IDS_PADDED, MASK)),
                               hf_logits(written, IDS_PADDED, MASK), atol=2e-4, rtol=0)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["embed_tokens"]}))
    with pytest.raises(jpeft.AdapterError, match="modules_to_save=.*cannot be honoured"):
        jpeft.load_adapter(str(tmp_path / "peft"), params)


def by_hand(model, params, options):
    """The head's logits computed in numpy from the model's hidden states."""
    hidden = np.asarray(model.apply({"params": params}, IDS_PADDED, MASK, return_hidden=True))
    if options.get("pooling") == "mean":
        x = (hidden * MASK[..., None]).sum(1) / MASK.sum(1, keepdims=True)
    else:
        x = hidden[np.arange(len(MASK)), MASK.sum(1) - 1]
    head = jax.tree.map(np.asarray, params)
    if "hidden" in options:
        x = np.tanh(x @ head["score_hidden"]["kernel"] + head["score_hidden"]["bias"])
    return x @ head["score"]["kernel"] + head["score"].get("bias", 0)


@pytest.mark.parametrize("options, reason", [({"pooling": "mean"}, "mean pooling"), ({"hidden": 8}, "an MLP head")])
def test_heads_hf_lacks_use_jpeft_dirs_and_hf_export_says_why(base, tmp_path, options, reason):
    """Mean pooling and MLP heads compute what they claim, round-trip through jpeft's dir, and HF export refuses."""
    family, _, model, params = base
    lora = {**LORA, "targets": FAMILIES[family]["lora"]}
    body, head = split_head(jpeft.Classifier(3, lora=lora, **options).init(jax.random.key(0), params))
    trained = {**perturb(body, ("lora_b",), jax.random.key(1)), **perturb(head, ("bias",), jax.random.key(2))}
    logits = np.asarray(jpeft.classify(model, trained, IDS_PADDED, MASK))
    np.testing.assert_allclose(logits, by_hand(model, trained, options), atol=1e-5)
    jpeft.save_adapter(str(tmp_path / "adapter"), trained)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "JPEFT"
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(np.asarray(jpeft.classify(model, reloaded, IDS_PADDED, MASK)), logits, atol=1e-6)
    with pytest.raises(jpeft.CheckpointError, match=f"no HF checkpoint form \\({reason}"):
        jpeft.save_pretrained(str(tmp_path / "model"), model, jpeft.merge(trained))


def test_pooling_reads_the_last_attended_token_or_the_masked_mean():
    """Last-token pooling must follow the mask on either side, as HF's last-non-pad rule does."""
    hidden = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1]])  # right- and left-padded
    np.testing.assert_array_equal(Classifier.pool(hidden, mask), hidden[[0, 1], [1, 3]])
    np.testing.assert_allclose(Classifier.pool(hidden, mask, np.int32(1)),
                               [hidden[0, :2].mean(0), hidden[1, 1:].mean(0)])


def test_counts_are_the_head_plus_lora_as_peft_counts(tiny_llama):
    """The head counts (and trains by default) without any base kernel; with LoRA, PEFT's own number."""
    _, path = tiny_llama
    params = jpeft.from_pretrained(path)[1]
    d = 32
    total = jpeft.count_parameters(params)[1] - 97 * d  # the base without its LM head
    for options, head in (({}, d * 3), ({"hidden": 16}, d * 16 + 16 + 16 * 3 + 3)):
        adapted = jpeft.Classifier(3, **options).init(jax.random.key(0), params)
        assert jpeft.count_parameters(adapted) == (head, total + head)
        mask = T.flatten(jpeft.trainable_mask(adapted))  # by default too, and no base kernel with it
        assert mask == T.flatten(jpeft.Classifier(3, **options).mask(adapted))
        assert not any(trained for p, trained in mask.items() if p.startswith("model/"))
    with_lora = jpeft.Classifier(3, lora=LORA).init(jax.random.key(0), params)
    reference = peft.get_peft_model(hf_classifier(path, 3), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                            target_modules=["q_proj", "v_proj"]))
    assert jpeft.count_parameters(with_lora)[0] == reference.get_nb_trainable_parameters()[0] == 992


def test_labels_map_sorted_strings_and_integer_ids_and_name_bad_rows():
    """Label ids must not depend on row order, and a bad label names its row."""
    rows = datasets.Dataset.from_list([{"y": "pos"}, {"y": "neg"}, {"y": "mid"}, {"y": "neg"}])
    names = label_names(rows, "y", "f.jsonl")
    assert names == ["mid", "neg", "pos"] and list(label_ids(rows, "y", "f.jsonl", names)) == [2, 1, 0, 1]
    ints = datasets.Dataset.from_list([{"y": 2}, {"y": 0}])
    assert label_names(ints, "y", "f.jsonl", num_labels=4) == ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]
    assert list(label_ids(ints, "y", "f.jsonl", label_names(ints, "y", "f.jsonl"))) == [2, 0]
    with pytest.raises(jpeft.DataError, match="holds 3 classes but method.num_labels=2"):
        label_names(rows, "y", "f.jsonl", num_labels=2)
    mixed = datasets.Dataset.from_list([{"y": 1}, {"y": -1}])
    with pytest.raises(jpeft.DataError, match="row 2: label -1 .* is not a class id"):
        label_names(mixed, "y", "f.jsonl")


def test_a_row_ending_in_the_pad_token_is_refused_for_hf_pooling():
    """HF would pool a different token than jpeft for such a row, so an export could not match."""
    tokenizer = make_tokenizer(pad=False)  # EOS stands in for the pad token
    rows = [{"text": "cat sat"}, {"text": "dog ran </s>"}]
    examples = tokenize_classification(rows, tokenizer, "{text}", 16, [0, 1])
    with pytest.raises(jpeft.DataError, match="row 2 .* ends with token id 2, the pad token"):
        check_last_not_pad(examples, tokenizer, "f.jsonl")


def test_config_lora_options_nested_or_dotted_and_errors(toy, tmp_path):
    """method.lora from YAML and dotted overrides merge, typed like method.*; mistakes fail before training."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "classifier", "lora": {"rank": 2, "targets": ["q_proj"]}}}))
    cfg = load_config(str(path), ["method.lora.alpha=4", "method.lora.targets=q_proj,v_proj"])
    assert cfg.method.lora == {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"]}
    assert trainer.build_method(cfg, ["a", "b"]).lora.targets == ("q_proj", "v_proj")
    with pytest.raises(jpeft.ConfigError, match="'method.lora.rnak' .* not an option of jpeft.LoRA; did you mean "
                                                "'method.lora.rank'"):
        load_config(str(path), ["method.lora.rnak=8"])
    with pytest.raises(jpeft.ConfigError, match="'data.label' .* is required by method.name=classifier"):
        load_config(None, ["method.name=classifier", "data.train=x.jsonl", "data.text=text"])
    with pytest.raises(jpeft.DataError, match="no label column 'sentiment' \\(data.label\\); columns are: text, label"):
        trainer.train(toy_config(toy, tmp_path / "out", "data.label=sentiment"), progress=False)


def test_t5_is_refused_saying_why(tmp_path):
    """HF's T5 classifier reads the decoder's last EOS through a head of its own: jpeft says it has none, and
    `jpeft train` refuses a label column on T5 before any work."""
    from conftest import make_t5
    tokenizer = make_tokenizer()
    _, path = make_t5(tmp_path / "t5", vocab_size=len(tokenizer), pad_token_id=0, decoder_start_token_id=0)
    with pytest.raises(jpeft.JpeftError, match="no classification head for encoder-decoders \\(T5\\).*"
                                               "T5ForSequenceClassification.*generate the label text"):
        jpeft.Classifier(num_labels=2).init(jax.random.key(0), jpeft.from_pretrained(path)[1])
    tokenizer.save_pretrained(path)
    toy = {"base": path, "train": write_jsonl(tmp_path / "train.jsonl", toy_rows(8, 0)),
           "eval": write_jsonl(tmp_path / "eval.jsonl", toy_rows(4, 1))}
    with pytest.raises(jpeft.ConfigError, match="t5 is an encoder-decoder: train it on data.prompt / data.target "
                                                "rows, not data.text, data.label"):
        trainer.train(toy_config(toy, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_hf_classifier_whose_pad_is_eos_pools_the_token_before_the_appended_eos(tmp_path):
    """HF pools the last token that is not its config's pad id. Where EOS stands in for pad and the tokenizer
    appends EOS, that is the token before the EOS even though the mask covers the EOS: jpeft reads the same."""
    ref = make_hf_model("llama", pad_token_id=2, eos_token_id=2)
    path = save_hf_model(ref, tmp_path / "base")
    head = np.random.RandomState(0).normal(size=(3, 32)).astype(np.float32)
    classifier = transformers.LlamaForSequenceClassification.from_pretrained(path, num_labels=3, dtype=torch.float32)
    with torch.no_grad():
        classifier.score.weight.copy_(torch.tensor(head))
    classifier.save_pretrained(tmp_path / "cls")
    ids = np.array([[1, 9, 10, 11, 12, 2, 2], [1, 13, 14, 2, 2, 2, 2]])  # each row ends with its EOS, then pads
    mask = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])
    model, params = jpeft.from_pretrained(str(tmp_path / "cls"))
    np.testing.assert_allclose(np.asarray(jpeft.classify(model, params, ids, mask)),
                               hf_logits(classifier.eval(), ids, mask), atol=2e-4, rtol=0)


def test_a_head_saved_without_config_loads_in_transformers_with_its_classes_and_pad(tmp_path):
    """save_pretrained of a 3-class head alone: config.json sizes the head (id2label) and, from the tokenizer,
    gives HF's pooling its pad id, so transformers loads it and runs padded batches."""
    path = save_hf_model(make_hf_model("llama"), tmp_path / "base")
    make_tokenizer().save_pretrained(path)
    model, params = jpeft.from_pretrained(path)
    tree = jpeft.Classifier(3).init(jax.random.key(0), params)
    jpeft.save_pretrained(str(tmp_path / "out"), model, tree, tokenizer_from=path)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert ref.config.num_labels == 3 and ref.config.pad_token_id == make_tokenizer().pad_token_id == 0
    np.testing.assert_allclose(hf_logits(ref.eval(), IDS_PADDED, MASK),
                               np.asarray(jpeft.classify(model, tree, IDS_PADDED, MASK)), atol=2e-4, rtol=0)


@pytest.mark.parametrize("family", ["olmo2", "phi3", "smollm3", "ministral", "ministral3", "seed_oss", "helium",
                                    "exaone4", "arcee", "glm", "glm4", "olmo", "stablelm", "gpt_neox", "phi", "gptj",
                                    "opt", "opt-350m", "bloom", "falcon", "starcoder2", "mpt", "mixtral", "qwen2_moe",
                                    "gpt_oss"])
def test_a_head_exports_as_the_familys_transformers_classifier(tmp_path, family):
    """... reading the features at the embedding's width where it differs (OPT-350m's project_out)."""
    from conftest import FAMILIES as SIZES, OPT_350M
    model_type, sizes = ("opt", OPT_350M) if family == "opt-350m" else (family, SIZES[family])
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model(model_type, **sizes, pad_token_id=0),
                                                        tmp_path / "b"))
    head = perturb(jpeft.Classifier(3).init(jax.random.key(0), params), ("bias",), jax.random.key(1))
    jpeft.save_pretrained(str(tmp_path / "model"), model, head)
    with torch.no_grad():
        theirs = hf_classifier(str(tmp_path / "model"), 3)(torch.tensor(IDS_PADDED),
                                                           attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jpeft.classify(model, head, IDS_PADDED, MASK)), theirs, atol=1e-5)


@pytest.mark.parametrize("family", ["granite", "codegen"])
def test_a_family_transformers_has_no_classifier_for_keeps_its_head_in_an_adapter_dir(tmp_path, family):
    """Granite and CodeGen have no *ForSequenceClassification: the head saves as an adapter dir, whole-model export
    says why."""
    from conftest import FAMILIES as SIZES
    model, params = jpeft.from_pretrained(save_hf_model(make_hf_model(family, **SIZES[family]), tmp_path / "b"))
    head = jpeft.Classifier(3).init(jax.random.key(0), params)  # HF's N(0, 0.02) head
    logits = np.asarray(jpeft.classify(model, head, IDS_PADDED, MASK))
    jpeft.save_adapter(str(tmp_path / "adapter"), head)
    reloaded = jpeft.load_adapter(str(tmp_path / "adapter"), params)
    np.testing.assert_allclose(np.asarray(jpeft.classify(model, reloaded, IDS_PADDED, MASK)), logits, atol=1e-6)
    with pytest.raises(jpeft.CheckpointError, match=f"transformers has no sequence classifier for {family} models"):
        jpeft.save_pretrained(str(tmp_path / "model"), model, head)


def test_heads_export_as_transformers_classifier_exactly_where_it_has_one():
    """... of the family's name (T5's, mT5's and UMT5's, which read the decoder's last EOS through a dense-tanh layer,
    apart: jpeft has no encoder-decoder head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as THEIRS
    from jpeft.models.families import SUPPORTED_TYPES
    from jpeft.models.hf import ARCHITECTURE, has_classifier
    decoders = [t for t in SUPPORTED_TYPES if t not in ("t5", "mt5", "umt5")]
    assert [t for t in decoders if has_classifier(t)] == [t for t in decoders if t in THEIRS]
    assert all(ARCHITECTURE[t] + "ForSequenceClassification" == THEIRS[t] for t in decoders if t in THEIRS)
