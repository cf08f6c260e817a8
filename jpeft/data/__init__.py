"""Data: rows from local files, templates, tokenization with loss masks, packing, batches, class labels, chat."""
import os

from jpeft.data.chat import conversations, tokenize_chat
from jpeft.data.examples import Examples, batches
from jpeft.data.labels import label_ids, label_names
from jpeft.data.sources import check_columns, load_rows
from jpeft.data.tokenize import (check_last_not_pad, encode_prompts, pad_id, render, render_all, template_columns,
                                 tokenize_classification, tokenize_seq2seq, tokenize_supervised, tokenize_text)

# The 500 DialogSum dev dialogues shipped with jpeft (CC BY-NC-SA 4.0; see its README.md).
DIALOGSUM_SAMPLE = os.path.join(os.path.dirname(__file__), "dialogsum", "dialogsum.dev.jsonl")

__all__ = ["DIALOGSUM_SAMPLE", "Examples", "batches", "check_columns", "check_last_not_pad", "conversations",
           "encode_prompts", "label_ids", "label_names", "load_rows", "pad_id", "render", "render_all", "template_columns",
           "tokenize_chat", "tokenize_classification", "tokenize_seq2seq", "tokenize_supervised", "tokenize_text"]
