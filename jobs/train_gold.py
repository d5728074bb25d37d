"""Build the offline sentiment gold model (MiniLM + logistic regression on rated movie snippets) into the cache.

    python -m jobs.train_gold [--out DIR] [--force]

Needs the assets `minilm` and `movie-snippets` (python -m jobs.assets). Prints the held-out report as JSON.
"""

import argparse
import json
import shutil

from ivg.gold import OFFLINE_REPORT, offline_dir, ensure_offline_sentiment


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="auto", help="model folder; 'auto' = the ivg cache")
    ap.add_argument("--force", action="store_true", help="retrain even if the folder exists")
    args = ap.parse_args(argv)
    out = offline_dir(args.out)
    if args.force:
        shutil.rmtree(out, ignore_errors=True)
    report = json.loads((ensure_offline_sentiment(out) / OFFLINE_REPORT).read_text())
    print(json.dumps({"path": str(out), **report}))
    return report


if __name__ == "__main__":
    main()
