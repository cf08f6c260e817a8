"""Data: rows from local files, templates, tokenization with loss masks, packing, batches."""
from jpeft.data.sources import check_columns, load_rows
from jpeft.data.tokenize import (Examples, batches, encode_prompts, render, template_columns,
                                 tokenize_supervised, tokenize_text)

__all__ = ["Examples", "batches", "check_columns", "encode_prompts", "load_rows", "render",
           "template_columns", "tokenize_supervised", "tokenize_text"]
