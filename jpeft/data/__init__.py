"""Data: rows from local files, templates, tokenization with loss masks, packing, batches."""
import os

from jpeft.data.sources import check_columns, load_rows
from jpeft.data.tokenize import (Examples, batches, encode_prompts, render, template_columns,
                                 tokenize_supervised, tokenize_text)

# The 500 DialogSum dev dialogues shipped with jpeft (CC BY-NC-SA 4.0; see its README.md).
DIALOGSUM_SAMPLE = os.path.join(os.path.dirname(__file__), "dialogsum", "dialogsum.dev.jsonl")

__all__ = ["DIALOGSUM_SAMPLE", "Examples", "batches", "check_columns", "encode_prompts", "load_rows", "render",
           "template_columns", "tokenize_supervised", "tokenize_text"]
