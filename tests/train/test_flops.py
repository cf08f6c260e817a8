"""The FLOPs a train step really does: the analytic count agrees with XLA's own count of the
compiled step (one layer: XLA counts a scanned loop's body once)."""
import jax
import numpy as np
import pytest

from jpeft import tree as T
from jpeft.models.config import ModelConfig
from jpeft.models.llama import CausalLM, init_params
from jpeft.peft import HRA, OFT, Full, LoHa, LoKr, LoRA
from jpeft.train.flops import train_step_flops
from jpeft.train.optimizer import adamw
from jpeft.train.step import init_state, make_train_step


@pytest.mark.parametrize("method", [Full(), LoRA(8, 16, ["q_proj", "v_proj", "down_proj"]),
                                    LoHa(8, 8, ["q_proj", "v_proj", "down_proj"]),
                                    LoKr(4, 8, ["q_proj", "v_proj", "down_proj"], decompose_both=True),
                                    OFT(32, targets=["q_proj", "v_proj", "down_proj"]),
                                    HRA(8, ["q_proj", "v_proj", "down_proj"])],
                         ids=["full", "lora", "loha", "lokr", "oft", "hra"])
def test_count_matches_xla(method):
    cfg = ModelConfig(model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=64)
    model = CausalLM(cfg)
    params = method.init(jax.random.key(0), init_params(model, jax.random.key(1)))
    mask = method.mask(params)
    trainable, frozen = T.partition(params, mask)
    optimizer = adamw(1e-4, 10, warmup=0, weight_decay=0.0, min_lr_ratio=1.0)
    step = make_train_step(model, optimizer, 0, dropout=False)
    ids = np.zeros((1, 4, 128), np.int32)  # 512 tokens: one loss chunk
    batch = {"input_ids": ids, "labels": ids, "loss_mask": np.ones(ids.shape, np.float32),
             "attention_mask": np.ones(ids.shape, np.int32)}
    cost = step.lower(init_state(trainable, optimizer), frozen, batch).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = train_step_flops(cfg, params, mask, tokens=512, seq_len=128)
    assert ours == pytest.approx(xla, rel=0.05)  # XLA also counts elementwise work and the optimizer


def test_lora_skips_the_frozen_weight_gradients():
    cfg = ModelConfig(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=16)
    params = init_params(CausalLM(cfg), jax.random.key(0))
    full = train_step_flops(cfg, params, Full().mask(params), 1000, 100)
    lora = LoRA(4, 8, ["q_proj"])
    adapted = lora.init(jax.random.key(1), params)
    frozen_count = train_step_flops(cfg, adapted, lora.mask(adapted), 1000, 100)
    weights = 2 * (4 * 64 * 64 + 3 * 64 * 128) + 64 * 1000  # two layers' projections + the LM head
    factors = 2 * (64 * 4 + 4 * 64)
    attention = 12 * 100 * 4 * 16 * 2
    assert full == 1000 * (6 * weights + attention)
    assert frozen_count == 1000 * (4 * weights + 6 * factors + attention)


def test_a_mixture_counts_its_router_and_k_experts_per_token():
    """Mixtral with 4 experts of width 32, top 2, costs a dense Llama of MLP width 64 plus its router; a LoRA on
    its experts, 2 of 4 experts' factors."""
    from jpeft.peft import LoRA
    sizes = dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16)
    dense_cfg = ModelConfig(model_type="llama", intermediate_size=64, **sizes)
    moe_cfg = ModelConfig(model_type="mixtral", intermediate_size=32, num_experts=4, experts_per_token=2, **sizes)
    dense, moe = (init_params(CausalLM(c), jax.random.key(0)) for c in (dense_cfg, moe_cfg))
    router = 2 * 4 * 64  # two layers' [4, 64]
    assert train_step_flops(moe_cfg, moe, Full().mask(moe), 10, 8) == pytest.approx(
        train_step_flops(dense_cfg, dense, Full().mask(dense), 10, 8) + 10 * 6 * router)
    lora = LoRA(4, 8, targets=[], target_parameters=["mlp.experts.down_proj"])
    adapted = lora.init(jax.random.key(1), moe)
    factors = 2 * 2 * 4 * (32 + 64)  # two layers, two of four experts, rank 4 from 32 to 64
    assert train_step_flops(moe_cfg, adapted, lora.mask(adapted), 10, 8) == pytest.approx(
        train_step_flops(moe_cfg, moe, jax.tree.map(lambda _: False, moe), 10, 8) + 10 * 6 * factors)
