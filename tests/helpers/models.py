"""Tiny random models and configs for tests (float64, so batched and naive decoding agree exactly)."""

from ivg.config import DecodeConfig, GenerationConfig, MethodConfig, Models, ModelSpec

PROMPTS = ["the movie was", "a", "I loved this film so much that I", "Plot: two friends, one dog"]


def tiny(name: str, kind: str = "causal_lm", **kw) -> ModelSpec:
    return ModelSpec(name, kind=kind, dtype="float64", device="cpu", **kw)


def tiny_models(explicit: str = "trm", guides: str = "tiny") -> Models:
    """explicit: trm (token reward model), rm (causal classifier), rm-b (classifier, other tokenizer)."""
    explicit_spec = {"trm": tiny("tiny:trm", "token_reward"), "rm": tiny("tiny:rm", "classifier"),
                     "rm-b": tiny("tiny-b:rm", "classifier")}[explicit]
    return Models(base=tiny("tiny:base", template="Review: {prompt}"),
                  tuned=tiny(f"{guides}:tuned"), untuned=tiny(f"{guides}:untuned"), explicit=explicit_spec)


def config(methods, explicit="trm", guides="tiny", **decode) -> GenerationConfig:
    decode = {"max_new_tokens": 10, "temperature": 0.8, **decode}
    return GenerationConfig(models=tiny_models(explicit, guides), decode=DecodeConfig(**decode),
                            methods=tuple(methods), seed=7)


def rows(prompts=PROMPTS):
    return [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)]


def cell(token: str, chunk: str, **kw) -> MethodConfig:
    shape = {} if chunk == "none" else {"W": 2, "K": 2, "L": 3}
    return MethodConfig(token=token, chunk=chunk, **{**shape, **kw})


def huge_model_folder(folder):
    """A model whose config asks for ~200 GB of weights: only its config and tokenizer exist."""
    from transformers import GPT2Config

    from ivg.tiny import tiny_tokenizer

    tok = tiny_tokenizer("tiny")
    GPT2Config(n_embd=8192, n_layer=64, n_head=64, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
