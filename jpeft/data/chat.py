"""Chat rows -> the tokenizer's chat template, with the loss on the assistant turns only.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}` messages.
The template is the only authority on layout, so assistant turns are found by rendering, not by
guessing markers: a turn spans from the end of the conversation before it rendered with the
generation prompt to the end of the conversation up to and including it, i.e. its content and the
template's end-of-turn marker (`<|im_end|>`, EOS), so the model learns to stop. Whitespace after
the marker (ChatML's newline) is layout between turns and stays untrained, as in HF's
`{% generation %}` blocks. The whole text is tokenized once, with character offsets, and every token
overlapping a span is trained, so the ids are exactly `tokenizer.apply_chat_template(messages)`.
"""
import dataclasses
import logging

import jinja2
import numpy as np

from jpeft.data.examples import Examples, next_token_examples
from jpeft.data.tokenize import Templates, _head_len, _keep_end, _log_truncation, pad_id, render_all
from jpeft.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
logger = logging.getLogger("jpeft.data")


def conversations(rows, path: str, prompt: Templates | None = None, target: Templates | None = None,
                  system: str | None = None) -> list[list[dict]]:
    """Each row of the data file `path` as a conversation: with the `prompt` and `target` templates, the
    rendered prompt as the user message and the rendered target as the assistant's; without them, the
    row's `messages` column (checked). `system` becomes the first message of rows that have none."""
    rows = list(rows)
    if prompt is not None:
        chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": t}]
                 for p, t in zip(render_all(prompt, rows), render_all(target, rows))]
    else:
        if rows and "messages" not in rows[0]:
            raise DataError(f"data file '{path}' row 1 has no column 'messages' (columns: {', '.join(rows[0])}); "
                            "data.chat needs a messages column (a list of {role, content} messages) or the "
                            "data.prompt and data.target templates")
        problems = [(i, p) for i, r in enumerate(rows) if (p := _problem(r.get("messages")))]
        if problems:
            (i, problem), more = problems[0], len(problems) - 1
            raise DataError(f"data file '{path}' row {i + 1}, column 'messages': {problem}"
                            f"{f' ({more} more rows with problems)' if more else ''}; each message needs a role "
                            f"({', '.join(ROLES)}) and a string content, and a row at least one assistant message")
        chats = [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in rows]
    if system is not None:
        chats = [c if any(m["role"] == "system" for m in c) else [{"role": "system", "content": system}, *c]
                 for c in chats]
    return chats


def tokenize_chat(chats: list[list[dict]], tokenizer, seq_len: int, pack: bool = True) -> Examples:
    """Conversations rendered by the tokenizer's chat template, the loss on assistant turns (see the module).

    Over-long conversations are cut on the right to seq_len + 1 tokens (later turns are lost; one that keeps
    no assistant token is dropped, and none kept at all is an error); pack=True puts several conversations
    in each row, as `tokenize_supervised` does.
    """
    check_template(tokenizer)
    if not tokenizer.is_fast:
        raise ConfigError("data.chat needs a fast tokenizer (character offsets); save the checkpoint's tokenizer "
                          "with a tokenizer.json, or set data.chat=false")
    rendered = [_rendered(chat, tokenizer, i) for i, chat in enumerate(chats)]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False,  # the template writes BOS
                        return_offsets_mapping=True)
    seqs, masks, trained_total, untrained_kept, dropped = [], [], 0, 0, 0
    for ids, offsets, (_, turns) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered):
        start, end = np.asarray(offsets, np.int64).reshape(-1, 2).T
        trained = np.zeros(len(ids), bool)
        for a, b in turns:
            trained |= (start < b) & (end > a)
        trained_total += int(trained.sum())
        kept = trained[:seq_len + 1]
        if not kept[1:].any():  # the turns before the first reply fill seq_len: nothing left to learn
            dropped += 1
            continue
        seqs.append(list(ids[:seq_len + 1]))
        masks.append(kept.astype(np.int32).tolist())
        untrained_kept += int((~kept).sum())
    n_truncated = sum(len(ids) > seq_len + 1 for ids in encoded["input_ids"])
    _log_truncation(n_truncated, len(chats), f"seq_len={seq_len}", "cut on the right, later turns lost")
    if dropped == len(chats):
        raise DataError(f"every conversation lost all its assistant turns to train.seq_len={seq_len} (the messages "
                        "before the first reply fill it); raise train.seq_len or shorten the prompts")
    if dropped:
        logger.warning("%d of %d conversations kept no assistant token within seq_len=%d and were dropped",
                       dropped, len(chats), seq_len)
    kept_total = sum(map(sum, masks))
    return dataclasses.replace(
        next_token_examples(seqs, masks, seq_len, pad_id(tokenizer), pack, n_truncated),
        prompt_tokens_lost=sum(map(len, encoded["input_ids"])) - trained_total - untrained_kept,
        target_tokens_lost=trained_total - kept_total)


def generation_prompts(prompts: list[str], tokenizer, system: str | None = None,
                       max_len: int | None = None) -> list[list[int]]:
    """Prompt ids for decoding from a chat-tuned model: each text as the user's message (after `system`, if
    given) in the tokenizer's chat template, opened for the assistant's reply (`add_generation_prompt`), as
    a chat run trains on it; cut from the left (keeping BOS) to at most max_len tokens."""
    check_template(tokenizer)
    chats = [[*([{"role": "system", "content": system}] if system is not None else []),
              {"role": "user", "content": text}] for text in prompts]
    texts = [_render(tokenizer, chat, i, add_generation_prompt=True) for i, chat in enumerate(chats)]
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # the template writes BOS
    if max_len is None:
        return ids
    _log_truncation(sum(len(x) > max_len for x in ids), len(ids), f"{max_len} prompt tokens", "cut from the left")
    return [_keep_end(x, max_len, _head_len(x, tokenizer)) for x in ids]


def check_template(tokenizer) -> None:
    if tokenizer.chat_template is None:
        raise ConfigError("the tokenizer has no chat template; add one ('chat_template') to the checkpoint's "
                          "tokenizer_config.json (or a chat_template.jinja beside it), or set data.chat=false "
                          "(jpeft train) / drop --chat (jpeft generate, eval)")


def _problem(messages) -> str | None:
    """What is wrong with one row's messages, or None."""
    if not isinstance(messages, list):
        return f"{type(messages).__name__} {messages!r:.80}, not a list of messages"
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {j} is {type(m).__name__} {m!r:.80}, not a {{role, content}} mapping"
        if m.get("role") not in ROLES:
            return f"message {j} has role {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return f"message {j} ({m['role']}) has content {m.get('content')!r:.80}, not a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message, so nothing to train on"
    return None


def _rendered(chat: list[dict], tokenizer, row: int) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character span of each assistant turn in it."""
    full = _render(tokenizer, chat, row)
    spans, at = [], 0
    for j, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, chat[:j], row, add_generation_prompt=True)
        upto = _render(tokenizer, chat[:j + 1], row).rstrip()
        if upto.startswith(before) and full.startswith(upto):
            spans.append((len(before), len(upto)))
        else:  # rendered otherwise once later turns follow (Qwen3 drops an earlier turn's think block)
            spans.append(_located(full, message["content"], upto, len(before) if full.startswith(before) else at,
                                  row, j))
        at = spans[-1][1]
    return full, spans


def _located(full: str, content: str, alone: str, start: int, row: int, j: int) -> tuple[int, int]:
    """The span of an assistant turn's content and end-of-turn marker (as the turn rendered last has it) in
    the whole conversation, from `start` on."""
    marker = alone[alone.rfind(content) + len(content):] if content in alone else None
    at = full.find(content, start)
    if marker is None or at < 0 or not full.startswith(marker, at + len(content)):
        raise DataError(f"row {row + 1}: the chat template renders message {j + 1}, an assistant turn, otherwise "
                        "inside the whole conversation than at its end, and its content and end-of-turn marker "
                        "cannot be found there; use a template that renders each turn the same whatever follows "
                        "it, or set data.chat=false")
    return at, at + len(content) + len(marker)


def _render(tokenizer, messages: list[dict], row: int, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise DataError(f"row {row + 1}: the chat template refused the conversation ({e}); fix the row's "
                        "messages (e.g. the role order the template expects)") from None
