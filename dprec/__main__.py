"""``dprec <stage> ...`` maps to ``python -m dprec.<stage> ...``."""

from __future__ import annotations

import importlib
import sys

STAGES = ("prepare", "extract", "train", "evaluate", "demo")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        print(f"usage: dprec {{{','.join(STAGES)}}} [options]   (each also runs as python -m dprec.<stage>)")
        return 2
    return importlib.import_module(f"dprec.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
