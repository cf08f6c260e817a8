"""Text metrics for generated outputs: ROUGE (best of several references), corpus BLEU, accuracy;
and a classifier's loss, accuracy and macro-F1."""
import re
from collections.abc import Sequence

import numpy as np

from jpeft.errors import DataError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def text_metrics(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict:
    """Mean ROUGE F-measures (0..1), corpus BLEU (0..100) and `n`.

    Each row may have any number (>= 1) of references; a bare string counts as one. ROUGE takes
    the best-scoring reference per row; BLEU matches n-grams against all of a row's references.
    """
    from rouge_score import rouge_scorer
    import sacrebleu

    refs = _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, row_refs in zip(predictions, refs):
        scores = scorer.score_multi([_sentences(r) for r in row_refs], _sentences(prediction))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    n = len(predictions)
    # sacrebleu wants one stream per reference slot; None marks "this row has fewer references".
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(list(predictions), streams).score
    return {**{name: totals[name] / n for name in ROUGE_TYPES}, "bleu": bleu, "n": n}


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """Fraction of predictions equal (after strip) to any of their references."""
    refs = _check(predictions, references)
    hits = sum(p.strip() in {r.strip() for r in row} for p, row in zip(predictions, refs))
    return hits / len(predictions)


def _sentences(text: str) -> str:
    """One sentence per line: rougeLsum scores sentence by sentence (the others ignore newlines)."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def _check(predictions, references) -> list[list[str]]:
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references; "
                        "score one prediction per reference row")
    if not predictions:
        raise DataError("no predictions to score; check data.eval and data.eval_limit")
    if not all(isinstance(p, str) for p in predictions):
        raise DataError("predictions must be strings (decoded text)")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, row in enumerate(refs, 1):
        if not row or not all(isinstance(r, str) for r in row):
            raise DataError(f"reference row {i} must hold one or more strings, got {row!r}")
    return refs


def predict(model, params, tokenizer, rows, prompt: str, max_new_tokens: int, batch_size: int = 16,
            chat: bool = False, system: str | None = None) -> list[str]:
    """Greedy continuations of the templated rows; a decoder's prompts are cut from the left so that they and
    the new tokens fit its positions. `chat`: each prompt is the user's message in the tokenizer's chat
    template (after a `system` message, if given), as a chat-tuned model reads it."""
    from jpeft.data import encode_prompts, render_all
    from jpeft.data.chat import generation_prompts
    from jpeft.generate import generate_text, require_prompt_room
    from jpeft.peft import sites

    room = require_prompt_room(model.config, max_new_tokens, sum(sites.virtual_tokens(params)))
    if chat:
        prompts = generation_prompts(render_all(prompt, rows), tokenizer, system, room)
    else:
        prompts = encode_prompts(rows, tokenizer, prompt, room, continued=not model.config.is_encoder_decoder)
    return [text.strip() for text in generate_text(model, params, tokenizer, prompts, max_new_tokens, batch_size)]


def evaluate_generation(model, params, tokenizer, rows, prompt: str, target_columns: Sequence[str],
                        max_new_tokens: int = 64, batch_size: int = 16, chat: bool = False,
                        system: str | None = None) -> dict:
    """ROUGE/BLEU of greedy outputs against one or more reference columns per row (`chat`: see `predict`)."""
    rows = list(rows)
    predictions = predict(model, params, tokenizer, rows, prompt, max_new_tokens, batch_size, chat, system)
    references = [[row[c] for c in target_columns] for row in rows]
    return text_metrics(predictions, references)


def classification_metrics(predicted: Sequence[int], labels: Sequence[int]) -> dict:
    """Accuracy and macro-F1: F1 averaged over the classes that occur among the labels or the
    predictions (scikit-learn's `average="macro"`), and `n`."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if len(predicted) != len(labels) or not len(labels):
        raise DataError(f"{len(predicted)} predictions for {len(labels)} labels; score one prediction per row")
    f1 = []
    for c in np.union1d(predicted, labels):
        hit = np.sum((predicted == c) & (labels == c))
        f1.append(2 * hit / (np.sum(predicted == c) + np.sum(labels == c)))
    return {"accuracy": float(np.mean(predicted == labels)), "macro_f1": float(np.mean(f1)), "n": len(labels)}


def evaluate_classifier(model, params, examples, batch_size: int = 16) -> dict:
    """Mean cross-entropy (`loss`), accuracy, macro-F1 and `n` of a classifier on tokenized examples
    (`jpeft.data.tokenize_classification`); the last batch is filled up with repeated rows."""
    import jax

    from jpeft.peft.classifier import class_nll, classify
    logits_of = jax.jit(classify, static_argnums=0)
    n = len(examples)
    logits = np.concatenate([np.asarray(logits_of(model, params, examples.input_ids[index],
                                                  examples.attention_mask[index]))
                             for index in (np.arange(s, s + batch_size) % n for s in range(0, n, batch_size))])[:n]
    nll = class_nll(logits, examples.labels)
    return {"loss": float(np.mean(nll)), **classification_metrics(logits.argmax(axis=-1), examples.labels)}


def evaluate_classification(model, params, tokenizer, rows, text: str, label_column: str, path: str,
                            labels: Sequence[str] | None = None, batch_size: int = 16) -> dict:
    """A classifier's loss, accuracy and macro-F1 on the rows of a data file (`path`, for errors): `text`
    templates its input, `label_column` holds each row's label, `labels` are the classifier's class
    names (default LABEL_0, ...); a label the classifier does not know is an error naming its row."""
    from jpeft.data import label_ids, tokenize_classification
    from jpeft.data.labels import default_names
    from jpeft.peft.classifier import require_head

    num_labels = int(np.shape(require_head(params)["kernel"])[-1])
    labels = list(labels) if labels is not None else default_names(num_labels)
    if len(labels) != num_labels:
        raise DataError(f"{len(labels)} saved class labels for a head of {num_labels} classes")
    ids = label_ids(rows, label_column, path, labels)
    examples = tokenize_classification(rows, tokenizer, text, model.config.max_position_embeddings, ids)
    return evaluate_classifier(model, params, examples, batch_size)
