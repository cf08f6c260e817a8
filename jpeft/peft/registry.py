"""Every method jpeft knows, once. Adding a method is one file plus one line in each list here.

`METHODS` are the leaf families the insertion points and the tree-wide operations (mask,
count, merge, axes, adapter export) consult, in the order their hooks apply; `BY_NAME` maps
`method.name` in a run config to the user-facing class. A class with a `peft_type` has an
adapter-directory mapping (`to_peft` / `from_peft`) in its own module (LoRA's in lora_format.py).
"""
from jpeft.peft.base import RebuiltWeight
from jpeft.peft.bitfit import BitFit
from jpeft.peft.bottleneck import Bottleneck
from jpeft.peft.classifier import Classifier
from jpeft.peft.full import Full
from jpeft.peft.hra import HRA
from jpeft.peft.ia3 import IA3
from jpeft.peft.llama_adapter import LlamaAdapter
from jpeft.peft.loha import LoHa
from jpeft.peft.lokr import LoKr
from jpeft.peft.lora import LoRA
from jpeft.peft.norm import NormTuning
from jpeft.peft.oft import OFT
from jpeft.peft.p_tuning import PTuning
from jpeft.peft.prefix import PrefixTuning
from jpeft.peft.prompt import PromptTuning
from jpeft.peft.road import RoAd
from jpeft.peft.qlora import QLoRA, Quantized, QuantizedExperts
from jpeft.peft.saved_modules import SavedModules
from jpeft.peft.trainable_tokens import TrainableTokens
from jpeft.peft.vera import VeRA

METHODS = (
    Quantized,
    QuantizedExperts,  # before LoRA: merging dequantizes the stack LoRA's experts' factors merge into
    LoRA,  # before IA3: IA3 scales the input or output of the whole W + s·A·B, so merge folds LoRA in first
    VeRA,
    LoHa,
    LoKr,
    OFT,
    HRA,
    IA3,
    RoAd,  # after LoRA too: it rotates the whole layer's output
    TrainableTokens,
    PromptTuning,
    PTuning,
    PrefixTuning,
    LlamaAdapter,
    Bottleneck,
    Classifier,
    SavedModules,  # PEFT's modules_to_save read from a dir: whole weights, marked
)
# methods whose `weight` hook rebuilds the weight from trained leaves in every call (FLOPs and memory count it)
REBUILT_WEIGHTS = tuple(m for m in METHODS if issubclass(m, RebuiltWeight))
HEAD_MODULES = frozenset(n for m in METHODS for n in m.heads)  # top-level modules of a trained head (a classifier's)

# A run config's method options where it names no targets and PEFT's defaults for the family differ from Llama's
# (peft.utils.constants: T5's, GPT-2's, GPT-NeoX's, Phi's, GPT-J's, CodeGen's, OPT's, BLOOM's, Falcon's and MPT's own
# projection names; IA3 on q_proj for Qwen and Gemma, on q_proj and k_proj for OPT), and BitFit's every projection.
# PEFT has no defaults for Phi-3: its fused projections stand in for Llama's (qkv_proj for q and v).
# methods whose unset targets default to LoRA's projections
LIKE_LORA = ("lora", "qlora", "vera", "loha", "lokr", "oft", "hra", "road")
QK_IA3 = {"ia3": {"targets": ["q_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}}
PHI3_QKV = {"targets": ["qkv_proj"]}
# GPT-NeoX's names, which BLOOM and Falcon share (their token tables apart)
QUERY_KEY_VALUE = {**dict.fromkeys(LIKE_LORA, {"targets": ["query_key_value"]}),
                   "ia3": {"targets": ["query_key_value", "dense_4h_to_h"], "feedforward": ["dense_4h_to_h"]},
                   "bitfit": {"targets": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}}
PHI_QV_MLP = {"targets": ["q_proj", "v_proj", "fc1", "fc2"]}
FAMILY_DEFAULTS = {
    "phi3": {**dict.fromkeys(LIKE_LORA, PHI3_QKV),
             "ia3": {"targets": ["qkv_proj", "down_proj"], "feedforward": ["down_proj"]},
             "bitfit": {"targets": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}},
    "gpt_neox": {**QUERY_KEY_VALUE, "trainable_tokens": {"targets": ["embed_in"]}},
    "falcon": {**QUERY_KEY_VALUE, "trainable_tokens": {"targets": ["word_embeddings"]}},
    "bloom": {**QUERY_KEY_VALUE, "trainable_tokens": {"targets": ["word_embeddings"]},
              "ia3": {"targets": ["query_key_value", "mlp.dense_4h_to_h"], "feedforward": ["mlp.dense_4h_to_h"]}},
    # PEFT's VeRA keeps Llama's q_proj, v_proj on Phi
    "phi": {**dict.fromkeys((m for m in LIKE_LORA if m != "vera"), PHI_QV_MLP),
            "ia3": {"targets": ["q_proj", "v_proj", "fc2"], "feedforward": ["fc2"]},
            "bitfit": {"targets": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]}},
    # PEFT's LoRA targets for CodeGen (its fused qkv_proj), Llama's IA3 by its names
    "codegen": {**dict.fromkeys(LIKE_LORA, PHI3_QKV), "trainable_tokens": {"targets": ["wte"]},
                "ia3": {"targets": ["qkv_proj", "fc_out"], "feedforward": ["fc_out"]},
                "bitfit": {"targets": ["qkv_proj", "out_proj", "fc_in", "fc_out"]}},
    "gptj": {"trainable_tokens": {"targets": ["wte"]},
             "ia3": {"targets": ["q_proj", "v_proj", "fc_out"], "feedforward": ["fc_out"]},
             "bitfit": {"targets": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]}},
    # PEFT has none for StarCoder2: Llama's, with its MLP's names
    "starcoder2": {"ia3": {"targets": ["k_proj", "v_proj", "c_proj"], "feedforward": ["c_proj"]},
                   "bitfit": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]}},
    # PEFT's LoRA targets for MPT, Llama's IA3 (which PEFT has none for) with its names
    "mpt": {**dict.fromkeys(LIKE_LORA, {"targets": ["Wqkv"]}), "trainable_tokens": {"targets": ["wte"]},
            "ia3": {"targets": ["Wqkv", "down_proj"], "feedforward": ["down_proj"]},
            "bitfit": {"targets": ["Wqkv", "out_proj", "up_proj", "down_proj"]}},
    "opt": {"ia3": {"targets": ["q_proj", "k_proj", "fc2"], "feedforward": ["fc2"]},
            "bitfit": {"targets": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}},
    **dict.fromkeys(("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), QK_IA3),
    "t5": {**dict.fromkeys(LIKE_LORA, {"targets": ["q", "v"]}),
           "ia3": {"targets": ["k", "v", "wo"], "feedforward": ["wo"]},
           "bitfit": {"targets": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]}},
    "gpt2": {"lora": {"targets": ["c_attn"]}, "qlora": {"targets": ["c_attn"]}, "vera": {"targets": ["c_attn"]},
             "trainable_tokens": {"targets": ["wte"]},
             "ia3": {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]},
             "bitfit": {"targets": ["c_attn", "c_proj", "c_fc"]}},
}
BY_NAME = {cls.name: cls for cls in (
    Full,
    LoRA,
    QLoRA,
    VeRA,
    LoHa,
    LoKr,
    OFT,
    HRA,
    IA3,
    RoAd,
    TrainableTokens,
    BitFit,
    NormTuning,
    PromptTuning,
    PTuning,
    PrefixTuning,
    LlamaAdapter,
    Bottleneck,
    Classifier,
)}
