"""``python -m asc_dist.data COMMAND``: tools for packed shards.

    python -m asc_dist.data verify SHARDS [--jobs N]   size + sha256 of every shard, every member's
                                                       digest (asc_dist.data.verify)

A subcommand is a module with ``add_parser(subparsers)`` registering its arguments and
``set_defaults(func=run)``, listed in :func:`build_parser`.
"""

from __future__ import annotations

import argparse

from asc_dist.cli import command


def build_parser() -> argparse.ArgumentParser:
    from asc_dist.data import verify

    parser = argparse.ArgumentParser(prog="python -m asc_dist.data",
                                     description="Tools for packed shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (verify,):
        module.add_parser(sub)
    return parser


@command("asc_dist.data")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
