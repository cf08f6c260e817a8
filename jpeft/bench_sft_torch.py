"""The PyTorch / HF PEFT side of ``jpeft bench --sft`` (see jpeft/bench_sft.py); never imports jax.

Mode "checkpoint" writes the random Llama both sides load (jpeft.bench_torch's model); mode
"train" fine-tunes it with LoRA as a PEFT user would, one example a row, each batch padded to its
longest row by the standard collator. Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from jpeft.bench_sft import load_examples, train_loop
from jpeft.data import batches
from jpeft.roofline import synchronize


def collate(rows: dict) -> dict:
    """Padded rows of single examples (jpeft.data `Examples.arrays()`) as HF's padded collator makes
    them: each whole sequence (the first input, then every next-token label) padded to the batch's
    longest, labels -100 off the target. HF shifts labels itself, so the loss falls on the same
    tokens as jpeft's loss_mask."""
    lengths = rows["attention_mask"].sum(axis=1) + 1
    width = int(lengths.max())
    ids = np.concatenate([rows["input_ids"][:, :1], rows["labels"]], axis=1)[:, :width]
    off = np.full((len(ids), 1), -100)
    labels = np.concatenate([off, np.where(rows["loss_mask"] > 0, rows["labels"], -100)], axis=1)[:, :width]
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask, "labels": labels.astype(np.int64)}


def in_order(examples, size: int):
    """Every example once, collated `size` at a time."""
    arrays = examples.arrays()
    for start in range(0, len(examples), size):
        yield collate({k: v[start:start + size] for k, v in arrays.items()})


def target_tokens(batch: dict) -> int:
    """The tokens HF's loss counts: labels after its one-token shift that are not -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _checkpoint(a: dict) -> dict:
    from jpeft.bench_torch import _build

    hf = {"vocab_size": a["vocab"], "hidden_size": a["hidden"], "num_layers": a["layers"], "num_heads": a["heads"],
          "num_kv_heads": a["kv_heads"], "intermediate_size": a["mlp"], "seq": a["seq"], "seed": a["seed"],
          "dtype": "float32"}
    _build(hf, "full").save_pretrained(a["checkpoint"])
    return {}


def _train(a: dict) -> dict:
    """LoRA on the checkpoint (bf16: a bf16 base with float32 adapters, forward and loss under autocast);
    AdamW with clip_grad_norm_ at 1.0, as jpeft's adamw clips."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(a["seed"])
    bf16, device = a["dtype"] == "bfloat16", a["device"]
    model = LlamaForCausalLM.from_pretrained(a["checkpoint"], dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(model, LoraConfig(r=a["rank"], lora_alpha=a["alpha"], target_modules=list(a["targets"]),
                                             lora_dropout=0.0), autocast_adapter_dtype=True).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a["lr"], weight_decay=a["weight_decay"])
    rows, held_out = load_examples(a["hf_peft"]), load_examples(a["held_out"])

    def tensors(batch: dict) -> dict:
        return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}

    def data():
        for drawn in batches(rows, a["batch"], a["seed"]):
            batch = collate(drawn)
            mask = batch["attention_mask"]
            yield tensors(batch), (target_tokens(batch), mask.sum(), mask.size, len(mask))

    def train(batch):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)

    @torch.no_grad()
    def held_out_loss() -> float:
        total, count = 0.0, 0
        for batch in in_order(held_out, a["batch"]):
            b = tensors(batch)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                           ignore_index=-100, reduction="sum"))
            count += target_tokens(batch)
        return total / count

    out = train_loop(a, data(), train, held_out_loss)
    per_epoch = sum(target_tokens(batch) for batch in in_order(rows, a["batch"]))
    return {**out, "target_tokens_per_epoch": per_epoch, "rows_per_epoch": len(rows), "examples_per_epoch": len(rows),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    a = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    print(json.dumps({"checkpoint": _checkpoint, "train": _train}[a.pop("mode")](a)))
