"""Loading models and tokenizers, and turning a prompt into a model's own prompt tokens.

A name is a hub id, a local folder, a `.gguf` file, a tiny random model (`tiny:<x>`, see ivg/tiny.py),
or `<scheme>:<name>` for a scheme an application registers (`asset:<name>`: ivg.offline, fetched by
`python -m jobs.assets`). Schemes come from `register_scheme` or the `ivg.schemes` entry point group,
so the decoder never imports the applications. `trust_remote_code` stays off unless the spec
sets it; safetensors are preferred and pickle checkpoints are refused unless `allow_pickle`. A model
whose weights cannot fit in its device's free memory is refused before any of them is allocated.
"""

import functools
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ivg.attention import use_gqa_attention
from ivg.config import ModelSpec
from ivg.tiny import is_tiny, tiny_model, tokenizer_for


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():  # torch's own error is a stack of internals
        raise RuntimeError(f"device {device!r}: torch {torch.__version__} sees no CUDA device here "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use device: auto, "
                           "or give this role a GPU (pipeline.servers.<role>.num_gpus)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, decoding: bool = False) -> torch.dtype:
    """`auto`: bfloat16 on a GPU; on a CPU, bfloat16 for decoding where the CPU multiplies bf16 natively
    (AVX512-BF16 or AMX-BF16: 2.2x the float32 speed of SmolLM2 decoding on an AMD EPYC here, the gold
    reward within its interval; README), float32 otherwise (and always for training)."""
    if dtype == "auto":
        if device.type == "cuda" or (decoding and cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 dot products on this CPU (Linux: its flags). Without them oneDNN emulates bf16, slower
    than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


# scheme -> resolve(rest of the name) -> local path; filled by register_scheme or entry points
SCHEMES: dict[str, Callable[[str], Path]] = {}
ENTRY_POINTS = "ivg.schemes"


def register_scheme(scheme: str, resolve: Callable[[str], Path]) -> None:
    SCHEMES[scheme] = resolve


def resolve_name(name: str) -> str:
    """A `<scheme>:<rest>` name as the local path its scheme resolves it to; other names unchanged."""
    scheme, sep, rest = name.partition(":")
    if not sep or is_tiny(name) or not scheme.isidentifier():
        return name
    if scheme not in SCHEMES:
        found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS) if ep.name == scheme]
        if not found:
            return name  # not a scheme: a hub id or path with a colon
        register_scheme(scheme, found[0].load())
    return str(SCHEMES[scheme](rest))


def source(spec: ModelSpec) -> tuple[str, dict]:
    """Where to load from: (name or folder, from_pretrained kwargs)."""
    name, gguf_file = resolve_name(spec.name), spec.gguf_file
    if name.endswith(".gguf") and Path(name).is_file():
        name, gguf_file = str(Path(name).parent), Path(name).name
    kwargs = dict(trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return name, kwargs


def load_tokenizer(spec: ModelSpec):
    """Just the tokenizer: enough to validate vocabularies before any weights are loaded."""
    if is_tiny(spec.name):
        return tokenizer_for(spec.name)
    name, kwargs = source(spec)
    tok = AutoTokenizer.from_pretrained(name, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pad_id(tokenizer) -> int:
    """The id padding columns hold (masked, so its value never matters; 0 when there is none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def load(spec: ModelSpec, allow_pickle: bool = False, decoding: bool = False) -> LoadedModel:
    """`decoding`: the model only decodes (no training), which lets `dtype: auto` pick bf16 on a CPU."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device, decoding)
    if is_tiny(spec.name):
        model, tok = tiny_model(spec.name, spec.kind, dtype=dtype, device=device)
        return decoder(LoadedModel(spec, model.to(device), tok), decoding)
    name, kwargs = source(spec)
    cls = AutoModelForSequenceClassification if spec.kind == "classifier" else AutoModelForCausalLM
    # GGUF is not a pickle; otherwise demand safetensors unless pickles are explicitly allowed.
    allow_pickle = allow_pickle or spec.allow_pickle
    if not allow_pickle and "gguf_file" not in kwargs:
        refuse_pickle_only(Path(name))
    check_memory(name, cls, kwargs, dtype, device)
    safetensors = None if ("gguf_file" in kwargs or allow_pickle) else True
    model = cls.from_pretrained(name, dtype=dtype, use_safetensors=safetensors, **kwargs)
    return decoder(LoadedModel(spec, model.to(device).eval(), load_tokenizer(spec)), decoding)


def decoder(loaded: LoadedModel, decoding: bool) -> LoadedModel:
    """A model that only decodes attends without copying its cache per query head (ivg.attention)."""
    if decoding:
        use_gqa_attention(loaded.model)
    return loaded


def refuse_pickle_only(folder: Path) -> None:
    """A local folder with pickle weights and no safetensors: say why it is refused and what to do."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
    if pickles:
        raise OSError(f"{folder}: only pickle checkpoint(s) {pickles}, and loading a pickle can run code; "
                      "convert it to safetensors, or set allow_pickle: true for a source you trust")


def check_memory(name: str, cls, kwargs: dict, dtype: torch.dtype, device: torch.device) -> None:
    """Count the parameters on the meta device (no memory) and refuse weights larger than the free
    memory of `device`: a clear error now instead of an OOM kill halfway through loading."""
    config = AutoConfig.from_pretrained(name, **kwargs)
    with torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=kwargs["trust_remote_code"])
    need = sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if need > free:
        raise MemoryError(f"{name}: its weights need {need / 2**30:.1f} GiB in {dtype}, but {device} has only "
                          f"{free / 2**30:.1f} GiB free; use a smaller dtype, another device, or a smaller model")


def prompt_ids(loaded: LoadedModel, prompt: str) -> list[int]:
    """The model's own view of a prompt: its template applied, then tokenized."""
    tok, template = loaded.tokenizer, loaded.spec.template
    if template == "chat":
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
    else:
        ids = tok(template.format(prompt=prompt) if template else prompt).input_ids
    if not ids:
        raise ValueError("prompt is empty after templating and tokenization")
    return ids


def same_vocab(a, b) -> bool:
    """Token-wise guidance adds vectors over the vocabulary: ids must mean the same tokens."""
    return a is b or a.get_vocab() == b.get_vocab()

