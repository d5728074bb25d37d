"""Build the offline sentiment gold model (MiniLM + logistic regression on rated movie snippets) into the cache.

    python -m jobs.train_gold [--out DIR] [--force]

Needs the assets `minilm` and `movie-snippets` (python -m jobs.assets). Prints the held-out report as JSON.
A second call reuses the build unless its recipe (ivg.eval.gold.OfflineSentimentRecipe) changed.
"""

import argparse
import json

from ivg.eval.gold import OFFLINE_REPORT, OfflineSentimentRecipe, offline_dir
from ivg.offline.store import build_once


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="auto", help="model folder; 'auto' = the ivg cache")
    ap.add_argument("--force", action="store_true", help="retrain even if the folder holds this recipe's build")
    args = ap.parse_args(argv)
    from ivg.eval.gold import build_offline_sentiment

    out, recipe = offline_dir(args.out), OfflineSentimentRecipe()
    build_once(out, recipe.key(), lambda tmp: build_offline_sentiment(recipe, tmp), force=args.force)
    report = json.loads((out / OFFLINE_REPORT).read_text())
    print(json.dumps({"path": str(out), **report}))
    return report


if __name__ == "__main__":
    main()
