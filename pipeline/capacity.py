"""Will a search shape fit? A lower bound of what each model server needs, against the memory of
the nodes that can hold it, checked before any actor starts.

A server runs one forward per token step over the rows of every search it serves (the searches of
ceil(search_actors / replicas) search actors, merged), and a search holds the W*K rows of every
prompt of its shard. For each model the server holds:

  KV cache  rows x tokens x layers x 2 (K and V) x kv width x bytes per value
  logits    rows x vocab x 4 (one step's float32 logits, the value vectors are as large)
  weights   parameters x bytes per value

with tokens >= 2 (a prompt token and the first sampled one; a row may stop there), or >=
max_new_tokens + 1 when decoding cannot stop early (no stop strings, stop_at_eos off, a number). At the
first step every row is alive, so every term is a lower bound: a shape refused here cannot fit,
and a shape accepted may still not (long prompts, long responses). The servers and their resources
are PipelineConfig.plan's for the nodes' GPUs, as the run will start them. The memory of a CPU server
is its node's (Ray's `memory` resource: what the node lets tasks use; before a local run's Ray
starts, this machine's available memory, which is more). A GPU
server's device memory is not known before the actor runs on its node, so GPU servers are not
checked here (their weights are checked as they load, ivg.models.check_memory).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch

from ivg.config import ConfigError, ModelSpec
from ivg.engine import needed_roles
from ivg.models import resolve_dtype, source
from ivg.tiny import is_tiny, tiny_model
from pipeline.config import Config, ServerSpec

ROLE_MODELS = {"base": ("base",), "implicit": ("tuned", "untuned"), "explicit": ("explicit",)}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_width: int  # key/value heads x head dim
    vocab: int  # 0 for a classifier (no vocabulary logits)
    params: int
    bytes_per_value: int


@dataclass(frozen=True)
class Need:
    """A lower bound of one server replica's memory for the config's largest search."""
    server: str
    rows: int  # rows of one forward: merged searches x prompts per shard x W*K
    tokens: int
    kv: int  # bytes
    logits: int
    weights: int
    method: int  # index of the method with the most rows
    largest: tuple[str, int]  # (models.<role>, its weights' bytes) of the largest model it holds

    @property
    def total(self) -> int:
        return self.kv + self.logits + self.weights


def model_shape(spec: ModelSpec, gpu: bool) -> ModelShape:
    """Dimensions from the model's config alone (tiny models are built: milliseconds)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    device = torch.device(("cuda" if gpu else "cpu") if spec.device == "auto" else spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if is_tiny(spec.name):
        model, _ = tiny_model(spec.name, spec.kind)
        config, params = model.config, sum(p.numel() for p in model.parameters())
    else:
        name, kwargs = source(spec)
        config = AutoConfig.from_pretrained(name, **kwargs)
        cls = AutoModelForSequenceClassification if spec.kind == "classifier" else AutoModelForCausalLM
        with torch.device("meta"):  # parameters counted without memory
            params = sum(p.numel() for p in cls.from_config(config, trust_remote_code=spec.trust_remote_code)
                         .parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(text.num_hidden_layers, kv_heads * head_dim, 0 if spec.kind == "classifier" else text.vocab_size,
                      params, torch.tensor([], dtype=dtype).element_size())


def needs(config: Config, specs: dict[str, ServerSpec]) -> list[Need]:
    """One Need per server of `specs` (server name -> its resources, PipelineConfig.plan's)."""
    gen, p = config.generation, config.pipeline
    d = gen.decode
    fixed = not d.stop and not d.stop_at_eos and isinstance(d.max_new_tokens, int)  # not "auto": unknown here
    tokens = d.max_new_tokens + 1 if fixed else 2
    out = []
    for server, spec in specs.items():
        served = needed_roles(gen) if server == "colocated" else [server]
        gpu = spec.num_gpus > 0
        searches = math.ceil(p.search_actors / spec.replicas)
        prompts = config.pipeline.shard_size
        using = [i for i, m in enumerate(gen.methods) if server == "colocated" or server == "base"
                 or server in (m.token, m.chunk)]
        widest = max(using, key=lambda i: gen.methods[i].W * gen.methods[i].K)
        rows = searches * prompts * gen.methods[widest].W * gen.methods[widest].K
        shapes = {f"models.{m}": model_shape(getattr(gen.models, m), gpu) for role in served for m in ROLE_MODELS[role]}
        weights = {name: s.params * s.bytes_per_value for name, s in shapes.items()}
        out.append(Need(server, rows, tokens,
                        kv=sum(rows * tokens * s.layers * 2 * s.kv_width * s.bytes_per_value for s in shapes.values()),
                        logits=sum(rows * s.vocab * 4 for s in shapes.values()),
                        weights=sum(weights.values()), method=widest, largest=max(weights.items(), key=lambda kv: kv[1])))
    return out


def fits(demand: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0) >= v for k, v in demand.items())


def check_capacity(config: Config, nodes: list[dict], prompts: int | None = None) -> None:
    """Refuse a shape that cannot fit on any node that can hold its server, naming the field to change.
    `nodes`: ray.nodes(); `prompts`: the input's prompt count when known (a shard holds no more)."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    p = config.pipeline
    _, specs = p.plan(needed_roles(config.generation), sum(r.get("GPU", 0) for r in alive))  # as the run will start
    if prompts is not None and prompts < p.shard_size:  # the shape of the largest shard that will exist
        config = dataclasses.replace(config, pipeline=dataclasses.replace(p, shard_size=prompts))
    for need in needs(config, specs):
        spec = specs[need.server]
        if spec.num_gpus > 0:
            continue
        memory = max((r.get("memory", 0) for r in alive if fits(spec.demand(), r)), default=None)
        if memory is None or need.total <= memory:  # no node can hold it: wait_started says so
            continue
        m = config.methods[need.method]
        gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        if need.weights > memory:
            name, size = need.largest
            raise ConfigError(f"{name}: its weights need {gib(size)} (all of model server {need.server}'s: "
                              f"{gib(need.weights)}), more than the {gib(memory)} of the largest node that can "
                              "hold it; use a smaller model or dtype")
        raise ConfigError(
            f"pipeline.shard_size: model server {need.server} needs at least {gib(need.total)} for {need.rows} rows "
            f"(pipeline.shard_size={config.pipeline.shard_size} prompts x W*K={m.W * m.K} of methods[{need.method}]"
            f" x {math.ceil(p.search_actors / spec.replicas)} searches merged) of at least {need.tokens} tokens: KV caches "
            f"{gib(need.kv)}, logits {gib(need.logits)}, weights {gib(need.weights)}; the largest node that can "
            f"hold it has {gib(memory)}. Lower pipeline.shard_size, W*K or search_actors per replica")
