"""One command for every emulator: ``python -m airflow_stepops.testing FLAVOR [options]``.

Runs the emulator of FLAVOR (kubernetes, sagemaker, vertex, azureml, modal) on 127.0.0.1 until
SIGINT/SIGTERM; the options are the flavor's own (``--help`` after the flavor lists them), e.g.::

    python -m airflow_stepops.testing sagemaker --env-file /tmp/sm.env
"""

from __future__ import annotations

import importlib
import sys

EMULATED = ("kubernetes", "sagemaker", "vertex", "azureml", "modal")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in EMULATED:
        given = f"unknown flavor {args[0]!r}; " if args and not args[0].startswith("-") else ""
        print(f"usage: python -m airflow_stepops.testing FLAVOR [options]\n{given}FLAVOR is one of: "
              f"{', '.join(EMULATED)} (the local flavor needs no emulator)", file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f"airflow_stepops.testing.{args[0]}.__main__")
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
