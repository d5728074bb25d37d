"""The whole run in one typed config: run, data, models, decode, methods, pipeline, experiment, train, eval.

`models`, `decode` and `methods` are the engine's own dataclasses (ivg/config.py), `train` and `eval`
the applications' (ivg/train/config.py, ivg/eval/config.py); this file adds what only a distributed
run needs and the `experiment` section of jobs.run. Every section loads through ivg.config.from_dict. `load_config` reads YAML, applies command-line overrides, and
validates everything at once; `Config.resolved()` is what gets written next to the outputs, and
`Config.fingerprint()` hashes the settings that decide the output rows, so a rerun into the same
directory can refuse to mix rows made by two different configs.
"""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ivg.config import TRUNCATE, ConfigError, DecodeConfig, GenerationConfig, MethodConfig, Models, ModelSpec, check, \
    check_int32, from_dict, plain_name
from ivg.eval.config import EvalConfig
from ivg.train.config import ProbeConfig, TrainConfig
from pipeline.io import OUTPUT_SCHEMA


SOURCES = ("auto", "parquet", "csv", "json", "jsonl", "disk", "hf")  # pipeline/io.py:read_prompts
PLACEMENTS = ("auto", "separate", "colocated")
ROLES = ("base", "implicit", "explicit")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"  # a plain name: jobs may derive a directory from it (runs/<name>)
    seed: int = 0  # with the prompt id, the only source of randomness
    output: str | None = None  # output directory (overridden by --output)

    def validate(self, where: str = "run") -> None:
        check(plain_name(self.name), f"{where}.name",
              f"{self.name!r} must be a plain name (letters, digits, _ . + -): jobs make directories of it")


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # Parquet, CSV, JSON, JSONL, a save_to_disk folder or an HF dataset id (--input)
    source: str = "auto"  # auto: by suffix (.parquet, .csv/.tsv, .json/.jsonl/.ndjson) or folder, else an HF id
    split: str = "train"  # HF datasets and DatasetDict folders
    subset: str | None = None  # HF datasets config name
    id_column: str | None = "id"  # null: the row number becomes the id
    prompt_column: str = "prompt"
    columns: tuple[str, ...] = ()  # other input columns carried into the output rows (e.g. reference)
    limit: int | None = None  # only the first N prompts
    read_batch_rows: int = 1024  # Arrow record batch size while reading
    # a prompt longer than a model's context (less max_new_tokens): "fail" its rows, or "left": cut
    # characters from its start until it fits; the row's `truncated` says how many were cut
    truncate: str = "fail"

    def validate(self, where: str = "data") -> None:
        check(self.path is not None, f"{where}.path", "needs an input (a file, an HF dataset id, or --input)")
        check(self.source in SOURCES, f"{where}.source", f"{self.source!r} is not one of {SOURCES}")
        check(self.limit is None or self.limit >= 1, f"{where}.limit", "must be >= 1 (or null for all)")
        check(self.read_batch_rows >= 1, f"{where}.read_batch_rows", "must be >= 1")
        check(self.truncate in TRUNCATE, f"{where}.truncate", f"{self.truncate!r} is not one of {TRUNCATE}")
        twice = sorted({c for c in self.columns if self.columns.count(c) > 1})
        check(not twice, f"{where}.columns", f"{twice} listed more than once; name each carried column once")
        read = sorted(set(self.columns) & {self.id_column, self.prompt_column})
        check(not read, f"{where}.columns", f"{read} is already read as the id or the prompt (data.id_column, "
                                            "data.prompt_column); carry other columns")
        clash = sorted(set(self.columns) & set(OUTPUT_SCHEMA.names))
        check(not clash, f"{where}.columns", f"{clash} would overwrite output columns; rename them")


@dataclass(frozen=True)
class ServerSpec:
    """Ray resources of one model-server actor (and how many copies of it)."""

    num_cpus: float = 0.5
    # None: one GPU per server on a cluster that has GPUs (PipelineConfig.plan), else 0
    num_gpus: float | None = None
    replicas: int = 1  # search actors are spread over replicas; a session stays on one
    resources: dict[str, float] = field(default_factory=dict)  # custom node resources, e.g. {gpu_base: 1}
    torch_threads: int = 1  # intra-op threads; keep cpus * threads <= cores

    def validate(self, where: str) -> None:
        check_quantity(self.num_cpus, f"{where}.num_cpus")
        if self.num_gpus is not None:  # null: PipelineConfig.plan decides from the cluster's GPUs
            check_quantity(self.num_gpus, f"{where}.num_gpus")
            check(self.num_gpus <= 1 or self.num_gpus == int(self.num_gpus), f"{where}.num_gpus",
                  f"{self.num_gpus:g}: more than one GPU must be a whole number (Ray's rule)")
        for name, quantity in self.resources.items():
            check(name not in ("CPU", "GPU"), f"{where}.resources.{name}", "use num_cpus / num_gpus instead")
            check(name not in RAY_RESERVED, f"{where}.resources", f"{name!r} is not a custom resource name")
            check_quantity(quantity, f"{where}.resources.{name}")
        check(self.replicas >= 1, f"{where}.replicas", "must be >= 1")
        check(self.torch_threads >= 1, f"{where}.torch_threads", "must be >= 1")

    def demand(self) -> dict[str, float]:
        """What one replica asks Ray for, as node resources ({CPU, GPU, custom...}); of a spec as
        PipelineConfig.plan resolved it for a cluster (num_gpus set)."""
        need = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: v for k, v in need.items() if v > 0}


RAY_RESERVED = ("", "memory", "object_store_memory")  # names Ray keeps for itself


def check_quantity(value: float, where: str) -> None:
    """A Ray resource quantity: a finite number >= 0, in steps of 0.0001 (Ray's resolution)."""
    check(math.isfinite(value) and value >= 0, where, f"must be a finite number >= 0, got {value:g}")
    check(value == 0 or int(value * 10_000) >= 1, where, f"{value:g} is finer than Ray's resolution of 0.0001")


@dataclass(frozen=True)
class Servers:
    base: ServerSpec = field(default_factory=ServerSpec)
    implicit: ServerSpec = field(default_factory=ServerSpec)  # tuned + untuned in one actor
    explicit: ServerSpec = field(default_factory=ServerSpec)
    colocated: ServerSpec = field(default_factory=ServerSpec)  # the one actor of placement: colocated

    def validate(self, where: str = "pipeline.servers") -> None:
        for name in (*ROLES, "colocated"):
            getattr(self, name).validate(f"{where}.{name}")


@dataclass(frozen=True)
class PipelineConfig:
    # separate: an actor per role (the default when the cluster has GPUs); colocated: all roles in
    # one actor (the default on CPU, where separate processes only add copies and context switches)
    placement: str = "auto"
    servers: Servers = field(default_factory=Servers)
    batch_window_ms: float = 2.0  # how long a server waits to merge `next` calls of several searches; 0 = off
    search_actors: int = 2
    search_cpus: float = 0.25
    shard_size: int = 16  # prompts per shard (= per output file, = per search batch)
    max_in_flight: int | None = None  # shards submitted at once; default 2 per search actor
    # Faults. A dead actor is restarted by Ray (max_restarts) and the calls it had in flight are sent
    # again (max_task_retries); a restarted server has lost its sessions, so the searches on it fail
    # and their shards run again (shard_retries), as does a shard whose search raised.
    max_restarts: int = 1  # Ray restarts of a dead actor
    max_task_retries: int = 1  # Ray retries of a call to an actor that died
    shard_retries: int = 2  # a shard whose search raised is run again this many times, then marked failed
    call_timeout_s: float = 600.0  # a model call taking longer counts as a lost server: its shard is retried
    start_timeout_s: float = 1800.0  # actors not up by then (e.g. resources no node has) fail the run

    def validate(self, where: str = "pipeline") -> None:
        check(self.placement in PLACEMENTS, f"{where}.placement", f"{self.placement!r} is not one of {PLACEMENTS}")
        self.servers.validate(f"{where}.servers")
        check(self.batch_window_ms >= 0, f"{where}.batch_window_ms", "must be >= 0 (0 turns batching off)")
        check(self.search_actors >= 1, f"{where}.search_actors", "must be >= 1")
        check(self.search_cpus > 0, f"{where}.search_cpus", "must be > 0 (fractional is fine)")
        check(self.shard_size >= 1, f"{where}.shard_size", "must be >= 1")
        check_int32(self.shard_size, f"{where}.shard_size")
        check_quantity(self.search_cpus, f"{where}.search_cpus")
        check(self.max_in_flight is None or self.max_in_flight >= 1, f"{where}.max_in_flight", "must be >= 1")
        for name in ("max_restarts", "max_task_retries", "shard_retries"):
            check(getattr(self, name) >= -1, f"{where}.{name}", "must be >= 0 (or -1: unlimited)")
        for name in ("call_timeout_s", "start_timeout_s"):
            check(getattr(self, name) > 0, f"{where}.{name}", "must be > 0 seconds")

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or 2 * self.search_actors

    def plan(self, roles: list[str], cluster_gpus: float) -> tuple[str, dict[str, ServerSpec]]:
        """The placement and each server's resources on a cluster with `cluster_gpus` GPUs. `placement:
        auto` is an actor per role when the cluster has a GPU for each of them, else one actor for all;
        a server whose num_gpus is unset (null) gets one GPU when the cluster has any, else none."""
        def gpus(spec: ServerSpec) -> ServerSpec:
            auto = 1.0 if cluster_gpus > 0 else 0.0
            return dataclasses.replace(spec, num_gpus=auto if spec.num_gpus is None else spec.num_gpus)

        separate = {r: gpus(getattr(self.servers, r)) for r in roles}
        placement = self.placement
        if placement == "auto":
            wanted = sum(s.num_gpus * s.replicas for s in separate.values())
            placement = "separate" if cluster_gpus > 0 and wanted <= cluster_gpus else "colocated"
        return placement, {"colocated": gpus(self.servers.colocated)} if placement == "colocated" else separate


@dataclass(frozen=True)
class PromptsConfig:
    """`experiment.prompts`: evaluation prompts (and the guides' prompts) cut from a table.

    The table is shuffled with `seed`; its first `skip` rows are left out, the next `n` are evaluated,
    and the rest are the guides' (held-out, then training: ivg/train/layout.py), so no guide has
    trained on an evaluation prompt."""

    path: str  # Parquet / JSONL, or asset:<name>
    column: str = "prompt"
    id_column: str = "id"
    n: int | None = None  # evaluated prompts; None = all after `skip` (none left for guides)
    skip: int = 0  # rows left out before the evaluated ones
    prefix_words: int | None = None  # keep each text's opening words, for the model to continue
    min_words: int = 0  # skip shorter texts
    seed: int = 0

    def validate(self, where: str = "experiment.prompts") -> None:
        check(self.n is None or self.n >= 1, f"{where}.n", "must be >= 1 (or null for all)")
        check(self.skip >= 0, f"{where}.skip", "must be >= 0")
        check(self.prefix_words is None or self.prefix_words >= 1, f"{where}.prefix_words", "must be >= 1")


@dataclass(frozen=True)
class ExperimentConfig:
    """What jobs.run does before generating: fetch assets, cut prompts, fit the explicit probe."""

    prompts: PromptsConfig
    assets: tuple[str, ...] = ()  # offline assets to fetch first (python -m jobs.assets --list)
    explicit_probe: ProbeConfig | None = None  # becomes models.explicit

    def validate(self, where: str = "experiment") -> None:
        self.prompts.validate(f"{where}.prompts")
        from ivg.offline.assets import ASSETS

        unknown = [a for a in self.assets if a not in ASSETS]
        check(not unknown, f"{where}.assets", f"unknown asset(s) {unknown}; known: {sorted(ASSETS)}")


@dataclass(frozen=True)
class Config:
    models: Models
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    methods: tuple[MethodConfig, ...] = (MethodConfig(),)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    experiment: ExperimentConfig | None = None  # jobs.run: prompts, assets, probe
    train: TrainConfig | None = None  # jobs.run / jobs.train_guides: the guides this config uses
    eval: EvalConfig | None = None  # jobs.evaluate

    def __post_init__(self):
        # validates models, decode and methods (ivg's checks) against the models as they will be once
        # jobs.run has trained the guides and fitted the probe
        GenerationConfig(self.planned_models(), self.decode, self.methods, self.run.seed)
        self.run.validate()
        if self.experiment is None:  # jobs.run writes the prompts and sets data.path
            self.data.validate()
        else:
            self.experiment.validate()
        self.pipeline.validate()

    def planned_models(self) -> Models:
        """The models once training has filled them: a trained tuned model and the probe or token RM stand
        in (by name only) where the config leaves them to `train` and `experiment.explicit_probe`."""
        m = self.models
        # the probe, when asked for, is the explicit value (jobs.run fits it after training the guides)
        if self.experiment is not None and self.experiment.explicit_probe is not None and m.explicit is None:
            m = dataclasses.replace(m, explicit=ModelSpec("<fitted by experiment.explicit_probe>", kind="classifier"))
        if self.train is not None and m.tuned is None:
            m = dataclasses.replace(m, tuned=dataclasses.replace(self.train.untuned, name="<trained by train:>"),
                                    untuned=self.train.untuned)
            if self.train.token_rm is not None and m.explicit is None:
                m = dataclasses.replace(m, explicit=ModelSpec("<trained by train:>", kind="token_reward"))
        return m

    def needs_training(self) -> list[str]:
        """The models only jobs.run can make for this config (empty: jobs.generate can run it as it is)."""
        planned, given = self.planned_models(), self.models
        return [r for r in ("tuned", "untuned", "explicit") if getattr(given, r) is None and getattr(planned, r) is not None]

    @property
    def generation(self) -> GenerationConfig:
        if missing := self.needs_training():
            raise ConfigError(f"models.{missing[0]}: this config trains its guides or fits its probe first "
                              f"(the train: / experiment: sections); run it with `python -m jobs.run --config ...`")
        return GenerationConfig(self.models, self.decode, self.methods, self.run.seed)

    def resolved(self) -> dict:
        """Plain data (lists, not tuples): what `config.yaml` and the manifest record."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """Hash of everything that decides the output rows (not how many actors made them)."""
        data = self.resolved()
        decisive = {k: data[k] for k in ("models", "data", "decode", "methods")}
        decisive["seed"], decisive["shard_size"] = self.run.seed, self.pipeline.shard_size
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


MAX_CONFIG_BYTES = 1 << 24  # 16 MiB: far beyond any config, far below what could hurt
MAX_CONFIG_VALUES = 100_000  # scalars, lists and mappings once YAML aliases are expanded


class ConfigLoader(yaml.SafeLoader):
    """safe_load's loader (a config is data: tags that build Python objects are refused) that also
    refuses a key given twice in one mapping (YAML would keep the last one silently), and a document
    whose aliases expand it beyond MAX_CONFIG_VALUES (an alias bomb: a few lines that every later
    step, from_dict to json.dumps, would expand exponentially). Anchors and merge keys stay usable."""

    path = "config"

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            sizes: dict = {}
            if expanded_size(node, sizes, self.path) > MAX_CONFIG_VALUES:
                while big := [c for c in children(node) if sizes[id(c)] > MAX_CONFIG_VALUES]:
                    node = big[0]  # down to the first value that alone expands too far
                check(False, f"{self.path}: line {node.start_mark.line + 1}",
                      f"the config expands to more than {MAX_CONFIG_VALUES} values (YAML aliases?); write it out plainly")
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first.get(key)
                except TypeError:  # an unhashable key: safe_load's own error says so
                    continue
                check(earlier is None, f"{self.path}: line {line}",
                      f"duplicate key {key!r} (first on line {earlier}); YAML would keep only the last one")
                first[key] = line
        return super().construct_mapping(node, deep)


def children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def expanded_size(node, memo: dict, path: str) -> int:
    """Values in the document once every alias is expanded, counted on the composed graph (where an
    alias is one shared node) without expanding it; `memo` maps a node's id to its size."""
    if id(node) in memo:
        check(memo[id(node)] is not None, f"{path}: line {node.start_mark.line + 1}", "an alias refers to itself")
        return memo[id(node)]
    memo[id(node)] = None  # in progress: meeting it again means a recursive alias
    size = 1 + sum(expanded_size(c, memo, path) for c in children(node))
    memo[id(node)] = size = min(size, MAX_CONFIG_VALUES + 1)  # the sums stay small numbers
    return size


def read_yaml(path: str | Path) -> dict:
    """A config file as plain data (see ConfigLoader); every problem is a ConfigError naming the file."""
    try:
        size = Path(path).stat().st_size
        check(size <= MAX_CONFIG_BYTES, str(path), f"{size} bytes is not a config (limit {MAX_CONFIG_BYTES})")
        loader = ConfigLoader(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    loader.path = str(path)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:  # one line: what is wrong, and where
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML: {' '.join(filter(None, (e.context, e.problem)))}{at}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    finally:
        loader.dispose()
    check(isinstance(data, dict), str(path), "the config must be a mapping")
    return data


def load_config(path: str | Path, input: str | None = None, output: str | None = None) -> Config:
    """Read a YAML config; `input` / `output` (the command-line flags) override data.path / run.output."""
    data = read_yaml(path)
    if input is not None:
        data = {**data, "data": {**(data.get("data") or {}), "path": input}}
    if output is not None:
        data = {**data, "run": {**(data.get("run") or {}), "output": output}}
    return from_dict(Config, data, "config")
