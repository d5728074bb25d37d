"""Train the guides (DPO-tuned LM + token reward model) on gold-labelled samples of the untuned model.

    python -m jobs.train_guides --config train.yaml [--force]

prints the three guide models as YAML to paste under `models:` of a generation config. A second run with
the same settings reuses the cached folders; --force retrains. The config's `train:` section:

    train:
      untuned: {name: asset:smollm2-135m-instruct}     # a ModelSpec (ivg/config.py)
      explicit_init: null                              # the token RM's body; null = the untuned model
      prompts: {path: asset:movie-snippets, column: text, prefix_words: 8}   # or a list of strings
      gold: {kind: vader, name: vader}                 # ivg.gold.GoldSpec fields
      settings: {n_prompts: 128, max_new_tokens: 40}   # ivg.train.TrainSettings
      out: null                                        # null: <ivg cache>/guides

`prompts.path` is a JSONL or Parquet file or `asset:<name>`; `prefix_words` keeps each text's first words
(IMDB-style prompts: the opening of a review, for the model to continue).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from ivg.config import ConfigError, ModelSpec, check, from_dict
from ivg.train import GuideConfig, train_guides

SECTION_KEYS = {"untuned", "explicit_init", "prompts", "gold", "settings", "out"}


def read_prompts(spec) -> list[str]:
    if isinstance(spec, list):
        check(all(isinstance(p, str) and p for p in spec), "train.prompts", "must be non-empty strings")
        return spec
    check(isinstance(spec, dict) and "path" in spec, "train.prompts", "must be a list of strings or {path: ...}")
    unknown = set(spec) - {"path", "column", "prefix_words"}
    check(not unknown, "train.prompts", f"unknown key(s) {sorted(unknown)}; known: column, path, prefix_words")
    path, column, words = spec["path"], spec.get("column", "prompt"), spec.get("prefix_words")
    if path.startswith("asset:"):
        from ivg.assets import resolve

        path = str(resolve(path.removeprefix("asset:")))
    import pandas as pd

    frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_json(path, lines=True)
    check(column in frame.columns, "train.prompts.column", f"{column!r} is not a column of {path}: {list(frame.columns)}")
    texts = [str(t) for t in frame[column]]
    if words:
        texts = [" ".join(t.split()[:words]) for t in texts]
    return [t for t in texts if t]


def load_section(path: str) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    check(isinstance(data, dict) and isinstance(data.get("train"), dict), "train", f"{path} needs a `train:` mapping")
    section = data["train"]
    unknown = sorted(set(section) - SECTION_KEYS)
    check(not unknown, "train", f"unknown key(s) {unknown}; known: {sorted(SECTION_KEYS)}")
    check(isinstance(section.get("gold"), dict), "train.gold", "must be a mapping of ivg.gold.GoldSpec fields")
    check("prompts" in section, "train.prompts", "is required")
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_guides", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file with a `train:` section")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args(argv)
    try:
        section = load_section(args.config)
        gold_spec = section["gold"]
        fields = {k: v for k, v in section.items() if k not in ("prompts", "gold")}
        config = from_dict(GuideConfig, {**fields, "gold": json.dumps(gold_spec, sort_keys=True)}, "train")
        prompts = read_prompts(section["prompts"])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from ivg.gold import GoldScorer, GoldSpec

    print(f"gold: {gold_spec}; {len(prompts)} prompts available")
    scorer = GoldScorer(GoldSpec(**gold_spec))
    paths = train_guides(config, prompts, scorer.score, force=args.force)
    print(f"\nguides in {paths.dir}:")
    defaults = ModelSpec(name="")
    print(yaml.safe_dump({role: {k: v for k, v in dataclasses.asdict(spec).items()
                                 if k == "name" or v != getattr(defaults, k)}
                          for role, spec in paths.models().items()}, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
