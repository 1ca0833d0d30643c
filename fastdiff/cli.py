"""The ``fastdiff`` command line.

Each subcommand lives in ``fastdiff/commands/<name>.py`` and exposes ``add_parser(subparsers)``,
which registers its parser and sets ``handler``; it is imported only when listed here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order is the order shown by --help.
SUBCOMMANDS = ("demo", "generate", "schedule", "train", "bench", "profile")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdiff",
        description="Latent diffusion with fused kernels: generate images, train, benchmark.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"fastdiff.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"fastdiff.commands.{name}":
                raise
            continue  # subcommand not part of this build
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except BrokenPipeError:  # before OSError, its base class
        # Output piped into a reader that stopped early (`| head`): not an error of ours.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0
    except (ValueError, OSError, RuntimeError) as error:  # OSError: a file we cannot write
        print(f"fastdiff {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
