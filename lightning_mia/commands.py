"""The ``lightning-mia`` command (and ``train.py``): ``fit``/``validate``/``test``/``predict`` through the
LightningCLI (:mod:`lightning_mia.cli`), plus ``report``, ``compare`` and ``study`` on finished runs.

    lightning-mia --help                           # the commands and the known feature / attack / ... names
    lightning-mia fit --config configs/quickstart.yaml
    lightning-mia fit --help                       # every model, data, trainer and monitor (--mia.*) option
    lightning-mia report RUN_DIR [--out DIR]
    lightning-mia compare RUN_DIR RUN_DIR ... [--out DIR]
    lightning-mia study CONFIG ... [--fast] [--out docs/results.md]

Every command exits 0 on success. A user error -- an unknown name (the registries' ``KeyError``), a bad value
(``ValueError``), missing data (``FileNotFoundError``, :class:`lightning_mia.data.MissingDataError`), a config
option the parser rejects -- prints ``lightning-mia: error: <message>`` alone and exits 2; ``--debug`` (anywhere
on the line) or ``LIGHTNING_MIA_DEBUG=1`` shows the traceback instead. Anything else is a bug and keeps its
traceback (exit 1).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

PROG = "lightning-mia"
#: The LightningCLI's subcommands, then ours.
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
OWN_COMMANDS = ("report", "compare", "study")
DEBUG_FLAG = "--debug"
DEBUG_ENV = "LIGHTNING_MIA_DEBUG"
#: Exit status of a user error (argparse's, so scripts see the same code for every kind of usage error).
USER_ERROR = 2

_SUMMARIES = {
    "fit": "train with the membership-inference monitor (LightningCLI: model, data, trainer, --mia.*, --es.*)",
    "validate": "one evaluation epoch over the validation set (LightningCLI)",
    "test": "one evaluation epoch over the test set (LightningCLI)",
    "predict": "run inference (LightningCLI)",
    "report": "write the privacy report of a run from its mia/ files: report RUN_DIR [--out DIR]",
    "compare": "overlay the audits of several runs: compare RUN_DIR RUN_DIR ... [--out DIR]",
    "study": "the paper's study on your configs, with a results page: study CONFIG ... [--fast]",
}


class UserError(Exception):
    """An error whose message says everything the user needs (printed without a traceback)."""


def debug_enabled(args: Sequence[str] = ()) -> bool:
    """``--debug`` on the command line or ``LIGHTNING_MIA_DEBUG`` set to a true value."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return DEBUG_FLAG in args or env not in ("", "0", "false", "no", "off")


def registry_names() -> Dict[str, List[str]]:
    """``{what: sorted names}`` of every name users can give in a config (features, attacks, ...)."""
    import lightning_mia.data as data
    from lightning_mia.attacks import ATTACKS
    from lightning_mia.features import FEATURES
    from lightning_mia.models import MODELS
    from lightning_mia.ood import OOD_SOURCES
    from lightning_mia.protocols import PROTOCOLS

    return {
        "features (--mia.features)": sorted(FEATURES),
        "attacks (--mia.attacks)": sorted(ATTACKS),
        "protocols (--mia.protocol)": sorted(PROTOCOLS),
        "out-of-distribution sources (--mia.ood_sources)": sorted(OOD_SOURCES),
        "models (--model.model of ImageClassifier)": sorted(MODELS),
        "datamodules (--data)": sorted(n for n in data.__all__ if n.endswith("DataModule") and n != "MIADataModule"),
        "datamodule names (ood_sources: {name: dataset, datamodule: {name: ...}})": sorted(data.DATAMODULES),
    }


def _wrap(items: Sequence[str], indent: int, width: int = 100) -> str:
    lines, line = [], ""
    for item in items:
        piece = item if not line else f"{line}, {item}"
        if len(piece) + indent > width and line:
            lines.append(line + ",")
            line = item
        else:
            line = piece
    lines.append(line)
    return ("\n" + " " * indent).join(lines)


def top_help() -> str:
    """What ``lightning-mia --help`` (and a bare ``lightning-mia``) prints."""
    cmds = "\n".join(f"  {name:<10} {_SUMMARIES[name]}" for name in LIGHTNING_COMMANDS + OWN_COMMANDS)
    names = "\n".join(f"  {what}:\n    {_wrap(values, 4)}" for what, values in registry_names().items())
    return f"""usage: {PROG} [--debug] {{{','.join(LIGHTNING_COMMANDS + OWN_COMMANDS)}}} ...

Watch a model leak membership while it trains: PyTorch Lightning training with a live membership-inference
audit, and reports on finished runs.

commands:
{cmds}

  {PROG} COMMAND --help shows the options of one command (fit: every model, data, trainer and monitor option).

known names (a feature or attack is a name, or {{name: ..., tag: ..., **options}}):
{names}

options:
  -h, --help   show this message and exit
  --debug      show the full traceback of errors (also: {DEBUG_ENV}=1)

examples:
  {PROG} fit --config configs/quickstart.yaml
  {PROG} fit --config configs/quickstart.yaml --mia.every_n_epochs 5 --trainer.max_epochs 100
  {PROG} report runs/quickstart/version_0
  {PROG} compare runs/a/version_0 runs/b/version_0
"""


def _fail(message: str, hint: Optional[str] = None) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if hint:
        print(f"{PROG}: {hint}", file=sys.stderr)
    return USER_ERROR


def _user_message(err: BaseException) -> Optional[str]:
    """The message of a known user error, ``None`` for anything else (a bug: keep the traceback)."""
    from lightning_mia.data import MissingDataError

    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, argparse.ArgumentError):  # jsonargparse's parse errors (exit_on_error=False)
        return str(err)
    if isinstance(err, KeyError):  # only the registries' "Unknown feature 'x'. Known features: ..." lookups
        msg = err.args[0] if err.args else ""
        return msg if isinstance(msg, str) and msg.startswith("Unknown ") else None
    if isinstance(err, (MissingDataError, FileNotFoundError)):
        return str(err)
    if isinstance(err, ValueError):
        return str(err)
    return None


def _run_lightning(args: List[str]) -> int:
    from lightning_mia.cli import build_cli

    # Parse errors are raised (not printed with the parser's 80-line usage) and printed by main() as one line.
    # LightningCLI reads sys.argv when args is None; set it rather than pass args, which makes it warn.
    saved = sys.argv
    sys.argv = [saved[0] if saved else PROG] + args
    try:
        build_cli(None, parser_kwargs={"exit_on_error": False})
    finally:
        sys.argv = saved
    return 0


def _run_own(command: str, args: List[str]) -> int:
    if command == "study":
        from lightning_mia.study import main_study

        return int(main_study(args) or 0)
    from lightning_mia import report

    main_fn: Callable[[List[str]], int] = getattr(report, f"main_{command}")
    return int(main_fn(args) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns its exit status (the console script passes it to ``sys.exit``)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(raw)
    args = [a for a in raw if a != DEBUG_FLAG]
    if not args or args[0] in ("-h", "--help"):
        print(top_help())
        return 0
    command = args[0]
    try:
        if command in OWN_COMMANDS:
            return _run_own(command, args[1:])
        if command in LIGHTNING_COMMANDS or command.startswith("-"):  # e.g. `-c config.yaml fit`
            return _run_lightning(args)
        raise UserError(f"unknown command {command!r}; the commands are: "
                        f"{', '.join(LIGHTNING_COMMANDS + OWN_COMMANDS)} ({PROG} --help)")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - sorted below: user errors print a line, bugs keep their traceback
        message = _user_message(err)
        if message is None or debug:
            raise
        hint = None
        if isinstance(err, argparse.ArgumentError) and command in LIGHTNING_COMMANDS:
            hint = f"'{PROG} {command} --help' lists the options; --debug shows the traceback"
        elif not isinstance(err, UserError):
            hint = f"run with --debug (or {DEBUG_ENV}=1) for the traceback"
        return _fail(message, hint)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
