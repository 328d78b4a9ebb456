"""Steps the flavor tests submit: small functions that the emulators' job processes run."""

from __future__ import annotations


def greet(name: str) -> dict:
    """A step that says hello from its flavor; the greeting and where it found its bundle."""
    import os

    print("hello", name, "from", os.environ["STEPOPS_FLAVOR"], flush=True)
    return {"greeting": f"hi {name}", "bundle": os.environ["STEPOPS_BUNDLE_PATH"]}


def sleep_then_return(seconds: float) -> str:
    """A step that says so, sleeps ``seconds``, then returns ``done``."""
    import time

    print("sleeping", flush=True)
    time.sleep(seconds)
    return "done"


def print_lines(lines: int, pause: float = 0.02, linger: float = 0.0) -> int:
    """A step that prints ``line 0``, ``line 1``, ... ``pause`` s apart, then runs ``linger`` s more."""
    import time

    for i in range(lines):
        print(f"line {i}", flush=True)
        time.sleep(pause)
    time.sleep(linger)
    return lines


def raise_value_error(value: int) -> None:
    raise ValueError(f"bad input {value}")


def import_probe() -> str:
    """Needs ``stepops-probe``, which only the step's ``requirements`` install (tests/package_index.py)."""
    import stepops_probe  # type: ignore[import-not-found]

    return str(stepops_probe.VALUE)
