"""The ``mgmoe`` console script.

Each command lives in its own module, which defines ``add_parser(subparsers)``: it adds one
sub-parser and sets ``func`` (a callable taking the parsed arguments and returning an exit
status) with ``set_defaults``. To add a command, write that function and list the module in
:data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMAND_MODULES = (  # modules with an add_parser(subparsers) function, in help order
    "mgmoe_ds.data.cli_shards",
    "mgmoe_ds.cli_models",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgmoe", description="Routed mixture of heterogeneous experts for fine-grained species recognition.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the command; user errors are one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exn:  # DataError, ConfigError: user-caused, already one line
        print(f"mgmoe {args.command}: error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
