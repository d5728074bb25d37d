"""A tiny GGUF model file written here, for the GGUF loading and conversion paths."""

from pathlib import Path

import numpy as np


def write_tiny_llama_gguf(path: Path) -> np.ndarray:
    """A 2-layer llama GGUF with a byte-level BPE tokenizer and a chat template; returns the embeddings."""
    import gguf

    V, H, F, L, NH, KV = 32, 16, 32, 2, 2, 1
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *map(chr, range(ord("a"), ord("z") + 1)), "Ġ", "Ċ", "ab"]
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(H // NH)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((V, H)).astype(np.float32)
    w.add_tensor("token_embd.weight", embed)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    shapes = {"attn_q": (H, H), "attn_k": (KV * H // NH, H), "attn_v": (KV * H // NH, H), "attn_output": (H, H),
              "ffn_gate": (F, H), "ffn_up": (F, H), "ffn_down": (H, F)}  # numpy (out, in): GGUF stores reversed
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape).astype(np.float32) * 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embed
