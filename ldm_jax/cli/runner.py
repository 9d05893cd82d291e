"""The one wrapper every entry point runs in, and the flag helpers they share.

A mistake in the user's input (any `ldm_jax.UserError`, or a malformed flag) is printed as one
line, `error: ...`, and the command exits with status 2; anything else is a bug and keeps its
traceback. Entry points stay short: parse flags, call one library function.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from ldm_jax import UserError
from ldm_jax.cli import host_memory
from ldm_jax.config import loading as config_lib

EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's own prints the whole usage first)."""

    def __init__(self, prog: str, doc: str | None, **kwargs):
        super().__init__(prog=prog, description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """--coordinator_address / --num_processes / --process_id / --jax_distributed."""
    from ldm_jax.parallel import distributed
    distributed.add_flags(parser)


def initialize_distributed(args: argparse.Namespace):
    """Joins the multi-host job described by the flags, the launcher's environment, SLURM or the
    TPU pod (ldm_jax/parallel/distributed.py); a no-op for one process. Call it before anything
    touches a device."""
    from ldm_jax.parallel import distributed
    return distributed.initialize_from_args(args)


def parse_with_config_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]):
    """(args, overrides): `--config.x=y` overrides split from the regular flags."""
    overrides, rest = config_lib.split_config_args(list(argv))
    return parser.parse_args(rest), overrides


def load_config(spec: str, overrides):
    """`--config=path.py[:variant]` plus the `--config.key=value` overrides."""
    return config_lib.apply_overrides(config_lib.load_config(spec), overrides)


def run_command(command: Callable[[], object]) -> int:
    """Runs `command`; a UserError prints `error: <message>` alone and returns 2, anything else
    raises with its traceback. Returns 0 on success."""
    try:
        command()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def main_for(build_parser: Callable[[], argparse.ArgumentParser],
             command: Callable[[argparse.Namespace, list[str]], object],
             argv: Sequence[str] | None, *, config_overrides: bool = False) -> int:
    """The body of every entry point's `main(argv)`: parse (one-line errors), then run
    `command(args, overrides)` under `run_command`. Run as a command (`python -m ldm_jax.X`, argv
    None), it first re-executes itself with the XLA:CPU malloc settings where they apply
    (ldm_jax/cli/host_memory.py); called from another program it never does."""
    if argv is None and host_memory.running_as_command():
        host_memory.maybe_reexec()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        if config_overrides:
            args, overrides = parse_with_config_overrides(parser, argv)
        else:
            args, overrides = parser.parse_args(argv), []
    except SystemExit as e:  # --help (0) or a malformed flag (already reported in one line)
        return int(e.code or 0)
    return run_command(lambda: command(args, overrides))
