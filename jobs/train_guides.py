"""Train the guides (DPO-tuned LM + token reward model) on gold-labelled samples of the untuned model.

  ivg train-guides --config jobs/configs/sentiment-default.yaml [--force] [train.settings.epochs=1]

trains exactly the guides `ivg run` would train for the same config, and prints them as YAML to paste
under `models:` of a generation config. A second run with the same settings reuses the cached
folders; --force retrains. It reads two sections of the config:

    experiment:
      prompts: {path: asset:movie-snippets, column: text, prefix_words: 5, skip: 96, n: 64}
    train:
      untuned: {name: asset:smollm2-135m-instruct}     # a ModelSpec (ivg/config.py)
      gold: {kind: vader, name: vader}                 # labels the pairs; default: eval.gold
      settings: {n_prompts: 1024, heldout_prompts: 250, max_new_tokens: 24}   # ivg.train.config.TrainSettings
      dpo: {layers: 8, epochs: 2}                      # ivg.train.config.DPOSettings
      token_rm: {C: 0.01}                              # ivg.train.config.TokenRMSettings; null: none
      out: null                                        # null: <ivg cache>/guides

The guide prompts are the rows after the evaluated ones (jobs.run's split_prompts): the held-out
prompts first, then the training prompts (ivg/train/layout.py).
"""

import dataclasses
import sys

from jobs import cli


def parser(prog: str):
    p = cli.parser(prog, __doc__)
    cli.add_config_flags(p, what="YAML with `train:` and `experiment.prompts` sections")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m jobs.train_guides") -> int:
    args = parser(prog).parse_intermixed_args(argv)
    return cli.guarded(args, lambda: run(args))


def run(args) -> int:
    import yaml

    from ivg.config import ModelSpec, check, from_dict
    from ivg.eval.config import EvalConfig
    from ivg.train.config import TrainConfig
    from jobs.run import split_prompts
    from pipeline.config import PromptsConfig

    data = cli.config_data(args)
    check(isinstance(data.get("train"), dict), "train", f"{args.config} needs a `train:` mapping")
    config = from_dict(TrainConfig, data["train"], "train")
    check(isinstance((data.get("experiment") or {}).get("prompts"), dict), "experiment.prompts",
          "is required: where the training prompts come from")
    spec = from_dict(PromptsConfig, data["experiment"]["prompts"], "experiment.prompts")
    spec.validate()
    gold = config.gold or (from_dict(EvalConfig, data["eval"], "eval").gold if data.get("eval") else None)
    check(gold is not None, "train.gold", "needs a gold reward to label the pairs (or set eval.gold)")
    if args.print_config:
        cli.print_config({"train": dataclasses.asdict(config), "experiment": {"prompts": dataclasses.asdict(spec)}})
        return 0
    evaluated, guide_prompts = split_prompts(spec)
    print(f"gold: {gold.name} ({gold.kind}); {len(guide_prompts)} guide prompts after {len(evaluated)} evaluated")
    if args.dry_run:
        return 0

    from ivg.eval.gold import GoldScorer
    from ivg.train.guides import train_guides

    paths = train_guides(config, guide_prompts, GoldScorer(gold).score, gold, [t for _, t in evaluated],
                         force=args.force)
    print(f"\nguides in {paths.dir}:")
    defaults = ModelSpec(name="")
    print(yaml.safe_dump({role: {k: v for k, v in dataclasses.asdict(spec).items()
                                 if k == "name" or v != getattr(defaults, k)}
                          for role, spec in paths.models().items()}, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
