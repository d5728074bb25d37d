"""Build the offline sentiment gold model (MiniLM + logistic regression on rated movie snippets) into the cache.

  ivg train-gold [--output DIR] [--force]

Needs the assets `minilm` and `movie-snippets` (ivg assets). Prints the held-out report as JSON.
A second call reuses the build unless its recipe (ivg.eval.gold.OfflineSentimentRecipe) changed.
"""

import json
import sys

from jobs import cli


def parser(prog: str):
    p = cli.parser(prog, __doc__)
    p.add_argument("--output", default="auto", metavar="DIR", help="model folder (default: auto, the ivg cache)")
    p.add_argument("--force", action="store_true", help="retrain even if the folder holds this recipe's build")
    return p


def main(argv=None, prog: str = "python -m jobs.train_gold") -> int:
    args = parser(prog).parse_intermixed_args(argv)
    return cli.guarded(args, lambda: run(args))


def run(args) -> int:
    from ivg.eval.gold import OFFLINE_REPORT, OfflineSentimentRecipe, build_offline_sentiment, offline_dir
    from ivg.offline.store import build_once

    out, recipe = offline_dir(args.output), OfflineSentimentRecipe()
    build_once(out, recipe.key(), lambda tmp: build_offline_sentiment(recipe, tmp), force=args.force)
    report = json.loads((out / OFFLINE_REPORT).read_text())
    print(json.dumps({"path": str(out), **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
