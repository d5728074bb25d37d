"""Tiny random model families: real transformers models, built in memory in milliseconds.

They let every config and test run anywhere (no files, no network). Ids look like `tiny:<name>`
or `tiny-b:<name>`:
  tiny    GPT-2 body, character-level tokenizer.
  tiny-b  Llama body, a BPE tokenizer with merges: same text, other token ids (cross-tokenizer tests).
All models of one family share its tokenizer, so tiny:base can be guided token-wise by tiny:tuned.
Weights are seeded by the full id, so `tiny:tuned` and `tiny:untuned` differ but are reproducible.
"""

import hashlib
import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

FAMILIES = ("tiny", "tiny-b")
SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
# tiny-b merges frequent English bigrams so its tokens straddle tiny's.
MERGES_B = [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), (" ", "t"), ("r", "e"), ("o", "n")]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def is_tiny(name: str) -> bool:
    return name.split(":", 1)[0] in FAMILIES and ":" in name


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    if family == "tiny":
        vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
        merges = []
    elif family == "tiny-b":
        # Another id order and extra merged tokens: no id means the same thing in both families.
        merged = ["".join(m) for m in MERGES_B]
        vocab = {t: i for i, t in enumerate(SPECIALS + merged + CHARS[::-1])}
        merges = MERGES_B
    else:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", ignore_merges=False))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % (2**31)


def tiny_model(name: str, kind: str = "causal_lm", num_labels: int = 1, dtype=torch.float32):
    """Build the model `name` (e.g. 'tiny:tuned'); kind is causal_lm | token_reward | classifier."""
    family = name.split(":", 1)[0]
    tok = tiny_tokenizer(family)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.eos_token_id, num_labels=num_labels)
    if family == "tiny":
        # initializer_range 0.3 makes next-token distributions peaked, like a trained LM's.
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=1024,
                            initializer_range=0.3, **common)
        lm_cls, clf_cls = GPT2LMHeadModel, GPT2ForSequenceClassification
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                             initializer_range=0.3, tie_word_embeddings=False, **common)
        lm_cls, clf_cls = LlamaForCausalLM, LlamaForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(f"{name}|{kind}"))
        model = (clf_cls if kind == "classifier" else lm_cls)(config)
    return model.to(dtype).eval(), tok
