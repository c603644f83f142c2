"""The ``sparseinv`` command: parse, validate, call the Python API, print.

Each sub-command lives in its own module with a ``register(subparsers)`` that adds
its parser and sets ``func``. Bad input raises :class:`UsageError`, which becomes one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import NoReturn

from sparseinv.errors import UsageError


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"sparseinv: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from sparseinv.cli import demo, distill, evaluate, export, invert, quantize

    from sparseinv import __version__

    parser = _Parser(prog="sparseinv", description="Invert timm ViTs into synthetic training data, sparsely.")
    parser.add_argument("--version", action="version", version=f"sparseinv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (invert, quantize, evaluate, export, distill, demo):
        module.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"sparseinv: warning: {message}\n"


# Sub-commands that split their work over the processes torchrun starts.
DISTRIBUTED_COMMANDS = ("invert", "distill")


def _join_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun: join the process group, and turn the launcher's SIGTERM into an interrupt.

    When one rank fails, torchrun stops the others with SIGTERM; handled like Ctrl-C,
    their temporary files are removed and their finished batches kept.
    """
    from sparseinv import distributed

    if args.command not in DISTRIBUTED_COMMANDS:
        raise UsageError(f"sparseinv {args.command} runs as one process; start it without torchrun "
                         f"(only {' and '.join(DISTRIBUTED_COMMANDS)} use several).")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    distributed.init_from_env(str(getattr(args, "device", "cpu")).split(":")[0])


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)  # torch is not imported yet: --help and argument errors answer at once
    from sparseinv import distributed

    joined = False
    try:
        if distributed.launched_by_torchrun():
            _join_torchrun(args)
            joined = True
        code = int(args.func(args) or 0)
    except UsageError as err:
        print(f"sparseinv: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("sparseinv: interrupted; finished batches are kept, run the same command to continue.", file=sys.stderr)
        code = 130
    finally:
        distributed.shutdown()
    if joined:
        _leave_at_once(code)
    return code


def _leave_at_once(code: int) -> NoReturn:
    """End a torchrun rank now that its files are written and the process group is gone.

    Interpreter teardown after a distributed run can still destroy one of torch.distributed's
    C++ threads while it is joinable ("terminate called without an active exception",
    SIGABRT): about one two-process CPU distillation in 50 under load here, after both
    ranks had shut down cleanly. torchrun reports that as the whole job failing, so a rank
    skips the teardown, which has nothing left to do.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
