"""Parse-time checks that a step function and the arguments written literally in a DAG file can run remotely.

Kept apart from ``bundle.py`` so declaring step tasks imports as little as possible.
"""

from __future__ import annotations

import dis
import inspect
from collections.abc import Iterator
from functools import lru_cache
from types import CodeType, FunctionType
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


#: Airflow look-ups that need the worker's Airflow: where a step runs there is none (receiver, attribute)
_AIRFLOW_LOOKUPS = {("Variable", "get"), ("Variable", "set"), ("Variable", "delete"), ("Connection", "get"),
                    ("Connection", "get_connection_from_secrets"), ("BaseHook", "get_connection")}
_RECEIVERS = frozenset(r for r, _ in _AIRFLOW_LOOKUPS)
PORTABLE_LOOKUP_HELP = (
    "pass the value as an argument instead: a literal, an upstream task's result, or a template rendered "
    "on the worker such as \"{{ var.value.my_var }}\" or \"{{ conn.my_conn.password }}\" (arguments travel in "
    "the step's bundle, never in the job's spec); or give the step what it needs through the step "
    "operator's own environment (the connection's environment, Modal secrets, the service's secret store)"
)


def nested_codes(code: CodeType) -> Iterator[CodeType]:
    """A code object and every one nested in it (inner functions, lambdas, comprehensions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from nested_codes(const)


def instruction_line(ins: dis.Instruction, code: CodeType) -> int:
    positions = getattr(ins, "positions", None)  # Python >= 3.11
    return (positions.lineno if positions else None) or code.co_firstlineno


@lru_cache(maxsize=4096)
def _lookups_in(code: CodeType) -> tuple[tuple[str, str, int, bool], ...]:
    """(receiver, attribute, line, receiver is a global) of each ``Variable.get``-style call in one code
    object (cached per code object: parse budget)."""
    names = (*code.co_names, *code.co_varnames, *code.co_freevars, *code.co_cellvars)
    if _RECEIVERS.isdisjoint(names) and "get_connection" not in names:
        return ()
    found, previous = [], None
    for ins in dis.get_instructions(code):
        if previous is not None and ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            receiver, attribute = previous.argval, ins.argval
            if (receiver, attribute) in _AIRFLOW_LOOKUPS or (receiver.endswith("Hook") and attribute == "get_connection"):
                found.append((receiver, attribute, instruction_line(ins, code),
                              previous.opname in ("LOAD_GLOBAL", "LOAD_NAME")))
        previous = ins if ins.opname.startswith("LOAD_") and isinstance(ins.argval, str) else None
    return tuple(found)


def _imported_names(code: CodeType) -> set[str]:
    """Names a function binds by ``from ... import NAME`` (the local imports a step makes)."""
    return {ins.argval for inner in nested_codes(code) for ins in dis.get_instructions(inner)
            if ins.opname == "IMPORT_FROM"}


def _from_airflow(value: Any) -> bool:
    """Whether a module-level name is Airflow's (its class, or a subclass of one of Airflow's)."""
    kind = value if isinstance(value, type) else type(value)
    return any(str(getattr(k, "__module__", "")).startswith("airflow.") for k in kind.__mro__)


def airflow_lookups(fn: FunctionType) -> list[str]:
    """Reads of Airflow Variables and Connections by ``fn``, its nested functions and the functions of its
    own module (the DAG file) it calls: all of them travel with the step and run where Airflow is not.

    A receiver counts when it is Airflow's: a module-level name bound to Airflow's class (or one that is
    not bound yet), or a name the step imports itself; the user's own ``Variable`` or a local variable of
    that name does not."""
    found: list[str] = []
    seen: set[CodeType] = set()
    todo = [fn]
    while todo:
        current = todo.pop()
        imported = _imported_names(current.__code__)
        for code in nested_codes(current.__code__):
            if code in seen:
                continue
            seen.add(code)
            for receiver, attribute, line, is_global in _lookups_in(code):
                bound = current.__globals__.get(receiver, _from_airflow) if is_global else None
                if (is_global and (bound is _from_airflow or _from_airflow(bound))) or receiver in imported:
                    found.append(f"{receiver}.{attribute} (line {line}) in {code.co_name}")
            for name in code.co_names:
                helper = current.__globals__.get(name)
                if isinstance(helper, FunctionType) and helper.__module__ == fn.__module__:
                    todo.append(helper)
    return found


def check_step_callable(fn: Any) -> None:
    """Refuse, at parse time, step functions that cannot run remotely: generators, ``async def``, and
    functions reading Airflow Variables or Connections (there is no Airflow where a step runs)."""
    target = inspect.unwrap(fn)
    if not isinstance(target, FunctionType):
        return
    name = target.__qualname__
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise StepOperatorConfigError(
            f"python_callable {name}: a generator function (it uses yield) cannot be a step: a step returns one "
            "value; return a list, or write the items to files and return them"
        )
    if inspect.iscoroutinefunction(target):
        raise StepOperatorConfigError(
            f"python_callable {name}: an async def function cannot be a step; make it a plain function that "
            "runs the coroutine: def step(...): return asyncio.run(main(...))"
        )
    found = airflow_lookups(target)
    if found:
        raise StepOperatorConfigError(
            f"python_callable {name} reads Airflow Variables or Connections ({'; '.join(found)}), but a step "
            f"runs where there is no Airflow to ask; {PORTABLE_LOOKUP_HELP}"
        )
