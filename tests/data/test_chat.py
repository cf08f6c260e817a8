"""Chat rows: the chat template's own tokens, the loss on assistant turns (content + end-of-turn) only."""
import copy
import json
import logging
import shutil
import types

import numpy as np
import pytest

from jpeft.config import load_config
from jpeft.data import conversations, load_rows, tokenize_chat
from jpeft.data.bpe import train_bpe_tokenizer
from jpeft.errors import ConfigError, DataError
from conftest import read_metrics, run_config

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TURNS = [("system", "You answer in short sentences."), ("user", "Where did the cat sit?"),
         ("assistant", "On the mat, all day."), ("user", "And the dog?"), ("assistant", "It ran to the park."),
         ("user", "Then what?"), ("assistant", "Then it went home, happy.")]
MESSAGES = [{"role": r, "content": c} for r, c in TURNS]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE (decodes exactly) with ChatML's markers as single tokens and a ChatML template."""
    texts = [c for _, c in TURNS] + ["system user assistant", "a cat sat on the mat and the dog ran home"]
    tok = train_bpe_tokenizer(texts, 400, ["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def chat_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True)["input_ids"]


def ids_of(tok, text) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_loss_covers_every_assistant_turn_and_its_end_marker_only(tok):
    ex = tokenize_chat([MESSAGES], tok, seq_len=128, pack=False)
    n = int(ex.attention_mask[0].sum())
    full = chat_ids(tok, MESSAGES)
    assert ex.input_ids[0, :n].tolist() == full  # the template's own tokens (BOS written once, by the template)
    assert ex.labels[0, :n - 1].tolist() == full[1:]
    trained = ex.labels[0][ex.loss_mask[0] == 1]
    answers = [m["content"] + "<|im_end|>" for m in MESSAGES if m["role"] == "assistant"]
    assert tok.decode(trained) == "".join(answers)
    assert trained.tolist() == [t for a in answers for t in ids_of(tok, a)]  # each answer's tokens, nothing else
    runs = np.flatnonzero(np.diff(np.r_[0, ex.loss_mask[0], 0]) == 1)
    assert len(runs) == 3  # one contiguous span per assistant turn


def test_prompt_target_rows_and_system_message(tok, tmp_path):
    rows = [{"q": "Where did the cat sit?", "a": "On the mat."}, {"q": "And the dog?", "a": "It ran."}]
    chats = conversations(rows, "f.jsonl", "Answer: {q}", "{a}", system="Be brief.")
    assert chats == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Answer: " + r["q"]},
                      {"role": "assistant", "content": r["a"]}] for r in rows]
    path = tmp_path / "chat.jsonl"
    own = [{"role": "system", "content": "Mine."}, *MESSAGES[1:3]]
    path.write_text("".join(json.dumps({"messages": m, "id": i}) + "\n" for i, m in enumerate([MESSAGES[1:3], own])))
    assert conversations(load_rows(str(path)), str(path), system="Be brief.") == [
        [{"role": "system", "content": "Be brief."}, *MESSAGES[1:3]], own]  # a row's own system message is kept
    ex = tokenize_chat(chats, tok, seq_len=64, pack=False)
    for i, row in enumerate(rows):
        assert tok.decode(ex.labels[i][ex.loss_mask[i] == 1]) == row["a"] + "<|im_end|>"


def conversation_set(n):
    rng = np.random.default_rng(0)
    return [[MESSAGES[0], *MESSAGES[1:1 + 2 * int(rng.integers(1, 4))]] for _ in range(n)]


def test_packing_gives_the_same_labels_and_loss_per_conversation(tok):
    chats = conversation_set(7)
    plain = tokenize_chat(chats, tok, seq_len=96, pack=False)
    packed = tokenize_chat(chats, tok, seq_len=96, pack=True)
    assert len(packed) < len(plain)

    def example(ids, labels, loss):
        return tuple(ids.tolist()), tuple(labels.tolist()), tuple(loss.tolist())

    found = [example(*(a[r][packed.attention_mask[r] == s] for a in (packed.input_ids, packed.labels, packed.loss_mask)))
             for r in range(len(packed)) for s in range(1, packed.attention_mask[r].max() + 1)]
    want = []
    for i in range(len(plain)):
        at = np.flatnonzero(plain.attention_mask[i])[:-1]  # unpacked, the last token is an input predicting padding
        want.append(example(plain.input_ids[i][at], plain.labels[i][at], plain.loss_mask[i][at]))
    assert sorted(found) == sorted(want)
    indexed = packed.with_loss_index(multiple=4)
    for i in range(len(indexed)):
        k = int(indexed.loss_mask[i].sum())
        np.testing.assert_array_equal(np.sort(indexed.loss_index[i, :k]), np.flatnonzero(indexed.loss_mask[i]))


def test_long_conversations_are_cut_on_the_right_and_counted(tok, caplog):
    chats = [MESSAGES, MESSAGES[:3]]
    whole = tokenize_chat(chats, tok, seq_len=128, pack=False)
    seq_len = len(chat_ids(tok, MESSAGES)) - 10
    assert len(chat_ids(tok, MESSAGES[:3])) <= seq_len + 1
    with caplog.at_level(logging.WARNING, logger="jpeft.data"):
        cut = tokenize_chat(chats, tok, seq_len=seq_len, pack=False)
    assert cut.n_truncated == 1 and "1 of 2 rows" in caplog.text
    for a, b in ((cut.input_ids, whole.input_ids), (cut.labels, whole.labels), (cut.loss_mask, whole.loss_mask)):
        np.testing.assert_array_equal(a, b[:, :seq_len])  # the first seq_len + 1 tokens, masks unchanged


def test_lost_tokens_are_counted_and_a_conversation_with_no_reply_left_is_dropped(tok, caplog):
    """Cut to seq_len, the long conversation loses its last turns (prompt and target tokens counted); one whose
    first user turn fills seq_len keeps no assistant token and is dropped; if all are, that is an error."""
    long_user = [{"role": "user", "content": "a cat sat on the mat and the dog ran home " * 8},
                 {"role": "assistant", "content": "On the mat."}]
    full = [chat_ids(tok, c) for c in (MESSAGES, long_user)]
    seq_len = len(chat_ids(tok, MESSAGES[:3])) + 2  # the first reply fits, the long user turn does not
    assert len(full[1]) - 12 > seq_len + 1
    whole = tokenize_chat([MESSAGES], tok, seq_len=256, pack=False)
    with caplog.at_level(logging.WARNING, logger="jpeft.data"):
        cut = tokenize_chat([MESSAGES, long_user], tok, seq_len=seq_len, pack=False)
    assert len(cut) == 1 and "1 of 2 conversations kept no assistant token" in caplog.text
    np.testing.assert_array_equal(cut.input_ids, whole.input_ids[:, :seq_len])
    trained = whole.loss_mask.sum() + tokenize_chat([long_user], tok, seq_len=256, pack=False).loss_mask.sum()
    assert cut.target_tokens_lost == trained - cut.loss_mask.sum() > 0
    assert cut.prompt_tokens_lost == sum(map(len, full)) - trained - (seq_len + 1 - cut.loss_mask.sum())
    with pytest.raises(DataError, match="every conversation lost all its assistant turns to train.seq_len="):
        tokenize_chat([long_user], tok, seq_len=seq_len, pack=False)


def test_generation_prompts_open_the_assistants_turn(tok):
    from jpeft.data.chat import generation_prompts
    [ids] = generation_prompts(["Where did the cat sit?"], tok, "You answer in short sentences.")
    assert ids == tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    [cut] = generation_prompts(["Where did the cat sit?"], tok, "You answer in short sentences.", max_len=6)
    assert cut == [ids[0], *ids[-5:]]  # from the left, keeping BOS


def test_a_template_that_renders_earlier_turns_otherwise(tok):
    """Qwen3's template opens the last reply with an empty think block that earlier replies lose once a turn
    follows them: each reply is found in the whole conversation, its content and end-of-turn marker trained."""
    qwen3_like = copy.deepcopy(tok)
    qwen3_like.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ex = tokenize_chat([MESSAGES], qwen3_like, seq_len=128, pack=False)
    full = chat_ids(qwen3_like, MESSAGES)
    assert ex.input_ids[0, :len(full)].tolist() == full
    trained = qwen3_like.decode(ex.labels[0][ex.loss_mask[0] == 1])
    assert trained == ("On the mat, all day.<|im_end|>It ran to the park.<|im_end|>"
                       "<think>\n\n</think>\n\nThen it went home, happy.<|im_end|>")


def test_chat_errors(tok):
    bare = train_bpe_tokenizer(["a cat"], 300)
    with pytest.raises(ConfigError, match="no chat template.*tokenizer_config.json.*data.chat=false"):
        tokenize_chat([MESSAGES], bare, seq_len=64)
    bad_role = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]
    no_answer = MESSAGES[:2]
    not_text = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]
    for chat, problem in ((bad_role, "message 2 has role 'bot'"), (no_answer, "no assistant message"),
                          (not_text, r"message 2 \(assistant\) has content 3")):
        with pytest.raises(DataError, match=rf"'f.jsonl' row 2, column 'messages': {problem}"):
            conversations([{"messages": MESSAGES}, {"messages": chat}], "f.jsonl")
    with pytest.raises(DataError, match=r"row 1 has no column 'messages'.*data.prompt and data.target"):
        conversations([{"text": "a"}], "f.jsonl")
    with pytest.raises(DataError, match=r"row 1, column 'messages': str 'hi', not a list.* \(1 more rows"):
        conversations([{"messages": "hi"}, {"messages": None}], "f.jsonl")
    unstable = copy.deepcopy(tok)
    unstable.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} .{% endif %}\n{% endfor %}"
    with pytest.raises(DataError, match="row 2: the chat template renders message 3, an assistant turn, otherwise"):
        tokenize_chat([MESSAGES[:1], MESSAGES], unstable, seq_len=64)
    unstable.chat_template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}x"
    with pytest.raises(DataError, match=r"row 1: the chat template refused the conversation \(no system\)"):
        tokenize_chat([MESSAGES], unstable, seq_len=64)


def test_config_checks_and_encoder_decoder(tmp_path):
    from jpeft.train.trainer import prepare
    assert load_config(None, ["data.train=x.jsonl", "data.chat=true", "data.system=Be brief."]).data.chat
    with pytest.raises(ConfigError, match="'data.text'.*conflicts with data.chat"):
        load_config(None, ["data.train=x.jsonl", "data.chat=true", "data.text=t"])
    with pytest.raises(ConfigError, match="'data.label'.*conflicts with data.chat"):
        load_config(None, ["data.train=x.jsonl", "data.chat=true", "data.label=y", "method.name=classifier"])
    with pytest.raises(ConfigError, match="'data.system'.*needs data.chat=true"):
        load_config(None, ["data.train=x.jsonl", "data.text=t", "data.system=Be brief."])
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    cfg = load_config(None, [f"data.train={path}", "data.chat=true"])
    with pytest.raises(ConfigError, match="t5 is an encoder-decoder.*not .*data.chat"):
        prepare(cfg, str(path), None, model_cfg=types.SimpleNamespace(is_encoder_decoder=True, model_type="t5"))


# A template that ends each assistant turn with EOS (the tiny model's vocabulary has no room for markers); the
# newline after a block is written as an expression, since HF renders templates with trim_blocks.
EOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m.role }}:\n{{ m.content }}"
                "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}assistant:\n{% endif %}")


def test_train_on_assistant_turns_only(tiny_run, tmp_path):
    import jax

    import jpeft
    from jpeft.train import trainer

    model_dir = shutil.copytree(tiny_run["model"], tmp_path / "base")
    tok = trainer.load_tokenizer(str(model_dir))
    tok.chat_template = EOS_TEMPLATE
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    cfg = run_config(tiny_run, out, f"model.path={model_dir}", "data.chat=true", "data.prompt=Topic: {topic}",
                     "data.system=Summarize the dialogue on this topic.", "train.seq_len=192", "train.steps=8",
                     "data.eval_limit=2", "train.lr=3e-2", "method.targets=[q_proj,v_proj,down_proj,lm_head]")
    final = trainer.train(cfg, progress=False)
    rows = read_metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    # ROUGE of greedy replies to the eval prompts as chat turns (system, user, then the assistant's opening)
    from jpeft.evaluate import text_metrics
    from jpeft.generate import generate_text
    model, base = jpeft.from_pretrained(str(model_dir))
    params = jpeft.load_adapter(str(out / "adapter"), base)
    eval_rows = list(load_rows(tiny_run["eval"]))[:2]
    prompts = [tok.apply_chat_template([{"role": "system", "content": cfg.data.system},
                                        {"role": "user", "content": f"Topic: {r['topic']}"}],
                                       add_generation_prompt=True, tokenize=True)["input_ids"] for r in eval_rows]
    replies = [t.strip() for t in generate_text(model, params, tok, prompts, cfg.data.max_new_tokens)]
    assert final["eval_rougeL"] == pytest.approx(text_metrics(replies, [r["summary"] for r in eval_rows])["rougeL"])

    # eval_loss, independently: the NLL of each eval summary's tokens + EOS, read off one padded forward pass
    seqs, answers = [], []
    for row in load_rows(tiny_run["eval"]):
        chat = [{"role": "system", "content": cfg.data.system}, {"role": "user", "content": f"Topic: {row['topic']}"},
                {"role": "assistant", "content": row["summary"]}]
        seqs.append(chat_ids(tok, chat))
        answers.append(len(ids_of(tok, row["summary"] + tok.eos_token)))
        assert seqs[-1][-2] == tok.eos_token_id and seqs[-1][-1] != tok.eos_token_id  # then a newline: untrained
    width = max(map(len, seqs))
    ids = np.array([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, ids, (ids != tok.pad_token_id).astype(np.int32))))
    nll = [-logp[i, t, s[t + 1]] for i, (s, k) in enumerate(zip(seqs, answers))
           for t in range(len(s) - 2 - k, len(s) - 2)]  # the positions predicting the summary and EOS
    assert final["eval_loss"] == pytest.approx(np.mean(nll), rel=1e-4)
