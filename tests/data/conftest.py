"""A tiny word-level tokenizer built offline, with BOS/EOS/PAD, for tokenization tests."""
import pytest

WORDS = ("summarize the dialogue : a cat sat on mat dog ran to park and then home "
         "hello world it is sunny today we go out").split()


def make_tokenizer(bos: bool = True, pad: bool = True):
    """WordLevel tokenizer over WORDS; adds <s> before each text when `bos`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>" if pad else None)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tokenizer_without_pad():
    return make_tokenizer(pad=False)
