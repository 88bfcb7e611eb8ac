"""The ``lightning-mia`` command (and ``train.py``): ``fit``/``validate``/``test``/``predict`` through the
LightningCLI (:mod:`lightning_mia.cli`), plus ``report``, ``compare`` and ``study`` on finished runs.

    lightning-mia fit --config configs/quickstart.yaml
    lightning-mia fit --help                       # every model, data, trainer and monitor (--mia.*) option
    lightning-mia report RUN_DIR [--out DIR]
    lightning-mia compare RUN_DIR RUN_DIR ... --out DIR
    lightning-mia study CONFIG ... [--fast] [--out docs/results.md]

Every command exits 0 on success and non-zero on failure.
"""
from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns its exit status (the console script passes it to ``sys.exit``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("report", "compare"):
        from lightning_mia import report

        return int(getattr(report, f"main_{args[0]}")(args[1:]) or 0)
    if args and args[0] == "study":
        from lightning_mia.study import main_study

        return int(main_study(args[1:]) or 0)
    from lightning_mia.cli import build_cli

    build_cli(argv)  # None: LightningCLI reads sys.argv itself; errors exit non-zero through its parser
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
