"""The `expertyard` command."""

from __future__ import annotations

import argparse
import sys

from expertyard import __version__
from expertyard.errors import ExpertyardError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once: appended as "(default: X)" unless its help already says what the default is, or
    there is none to show (None, off, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """The same help formatter for the parser and every subcommand below it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_formatter(sub)


def build_parser() -> argparse.ArgumentParser:
    from expertyard.entrypoints import (bench, bench_serving, evaluate, generate, plan_cmd, pregate_cmd, quantize_cmd,
                                       serve_cmd, simulate_cmd, trace_cmd)

    parser = argparse.ArgumentParser(prog="expertyard", description="Fast inference for Mixture-of-Experts models")
    parser.add_argument("--version", action="version", version=f"expertyard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, evaluate, bench, pregate_cmd, trace_cmd, simulate_cmd, serve_cmd, bench_serving,
                   quantize_cmd, plan_cmd):
        module.add_parser(sub)
    _use_formatter(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "serving"]:  # `expertyard bench serving` is the bench-serving command
        argv = ["bench-serving", *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ExpertyardError as e:
        print(f"expertyard {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
