"""Random model families: real transformers models built in memory, no files, no network.

Ids look like `tiny:<name>`, `tiny-b:<name>` or `shape:<preset>[:v<vocab>]`:
  tiny    GPT-2 body, character-level tokenizer; built in milliseconds, for tests and smoke runs.
  tiny-b  Llama body, a BPE tokenizer with merges: same text, other token ids (cross-tokenizer tests).
  shape   the architecture of a real model (SHAPES: llama3-8b, smollm2-135m, ...) with random weights,
          built directly on its device in its dtype: a forward costs what the real model's costs, so
          speed checks of big shapes need no download. `:v<vocab>` sets the vocabulary size (guides
          that steer a base token-wise must share its vocabulary); the tokenizer is the tiny one's
          characters padded with placeholder tokens up to that size.
All models of one family (and vocabulary size) share a tokenizer, so tiny:base can be guided
token-wise by tiny:tuned. tiny weights are seeded by the full id, so `tiny:tuned` and `tiny:untuned`
differ but are reproducible on any device.
"""

import functools
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

FAMILIES = ("tiny", "tiny-b", "shape")
# real architectures (hyperparameters from their published configs), for speed checks with random weights
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=130000.0, tie_word_embeddings=True),
    "mini": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False),
}
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


def shape_parts(name: str) -> tuple[str, int]:
    """`shape:<preset>[:v<vocab>]` -> (preset, vocabulary size)."""
    _, preset, *rest = name.split(":")
    if preset not in SHAPES:
        raise ValueError(f"unknown shape {preset!r} in {name!r}; known: {sorted(SHAPES)}")
    vocab = SHAPES[preset]["vocab_size"]
    if rest:
        if len(rest) != 1 or not rest[0].startswith("v") or not rest[0][1:].isdigit():
            raise ValueError(f"{name!r}: expected shape:<preset>[:v<vocab size>]")
        vocab = int(rest[0][1:])
    return preset, vocab


def tokenizer_for(name: str) -> PreTrainedTokenizerFast:
    """The tokenizer of a random model id (shared by every model of its family and vocabulary)."""
    family = name.split(":", 1)[0]
    return shape_tokenizer(shape_parts(name)[1]) if family == "shape" else tiny_tokenizer(family)


@functools.lru_cache(maxsize=None)  # a 128k vocabulary takes a second to build; every model of a run shares it
def shape_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    base = SPECIALS + CHARS
    if vocab_size < len(base):
        raise ValueError(f"a shape vocabulary needs at least {len(base)} tokens, got {vocab_size}")
    vocab = {t: i for i, t in enumerate(base + [f"<x{i}>" for i in range(vocab_size - len(base))])}
    return _fast(Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")))


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
    return _fast(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", ignore_merges=False)))


def _fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % (2**31)


def tiny_model(name: str, kind: str = "causal_lm", num_labels: int = 1, dtype=torch.float32, device="cpu"):
    """Build the model `name` (e.g. 'tiny:tuned'); kind is causal_lm | token_reward | classifier."""
    family = name.split(":", 1)[0]
    tok = tokenizer_for(name)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.eos_token_id, num_labels=num_labels)
    if family == "shape":
        return shape_model(name, kind, common, dtype, device), tok
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


def shape_model(name: str, kind: str, common: dict, dtype, device) -> torch.nn.Module:
    """Random weights of a real architecture, allocated straight on `device` in `dtype` (an 8B model in
    bfloat16 is 16 GB: never materialised in float32 or on the CPU first)."""
    preset, _ = shape_parts(name)
    config = LlamaConfig(**{**SHAPES[preset], **common})
    cls = LlamaForSequenceClassification if kind == "classifier" else LlamaForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()
