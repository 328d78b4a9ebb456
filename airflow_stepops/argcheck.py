"""Parse-time check that arguments written literally in a DAG file can travel in a bundle.

Kept apart from ``bundle.py`` so declaring step tasks imports as little as possible.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk.definitions._internal.mixins import ResolveMixin

from airflow_stepops.artifacts import ArtifactRef
from airflow_stepops.exceptions import StepOperatorConfigError

_SIMPLE = (str, int, float, bool, bytes, type(None))
_PASSES = (*_SIMPLE, ResolveMixin, ArtifactRef)  # XComArgs and refs are resolved on the worker


def _simple(value: Any, depth: int = 0) -> bool:
    """Values that always pickle; XComArgs and refs are resolved on the worker, not pickled here."""
    if isinstance(value, _PASSES):
        return True
    if depth > 8:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_simple(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_simple(k, depth + 1) and _simple(v, depth + 1) for k, v in value.items())
    return False


def check_literal_args_picklable(fn: Any, op_args: Any, op_kwargs: Any) -> None:
    """Parse-time check for arguments written literally in the DAG file (cheap for plain data)."""
    if not op_args and not op_kwargs:
        return
    items = [(f"op_args[{i}]", a) for i, a in enumerate(op_args or ())]
    items += [(f"op_kwargs[{k!r}]", v) for k, v in (op_kwargs or {}).items()]
    for name, value in items:
        if isinstance(value, _PASSES) or _simple(value):
            continue
        import cloudpickle

        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            raise StepOperatorConfigError(
                f"{name} cannot be serialised by cloudpickle ({type(exc).__name__}: {exc}); "
                "pass plain data, or create the object inside the step"
            ) from exc
