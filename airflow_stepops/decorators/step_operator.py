"""``@task.step_operator``: a ``@task`` whose body runs on a registered step operator."""

from __future__ import annotations

import dis
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory

from airflow_stepops.argcheck import instruction_line, nested_codes
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.operators.base import StepOperator

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.bases.decorator import TaskDecorator

#: context values that mean the same thing remotely and can travel in a bundle
PORTABLE_CONTEXT_KEYS = frozenset({
    "params", "ds", "ds_nodash", "ts", "ts_nodash", "ts_nodash_with_tz", "logical_date", "run_id",
    "data_interval_start", "data_interval_end", "prev_data_interval_start_success",
    "prev_data_interval_end_success", "dag_run_conf", "map_index_template",
})


@lru_cache(maxsize=4096)
def _worker_only_reads(code: Any) -> tuple[tuple[str, str], ...]:
    """(key, where) of each parameter naming a worker-only context value and each such key read from the
    ``**kwargs`` parameter (``context["ti"]``, ``context.get("ti")``); cached per code object: parse budget."""
    from airflow.sdk.definitions.context import KNOWN_CONTEXT_KEYS

    worker_only = KNOWN_CONTEXT_KEYS - PORTABLE_CONTEXT_KEYS
    count = code.co_argcount + code.co_kwonlyargcount
    found = [(n, f"parameter {n!r}") for n in code.co_varnames[:count] if n in worker_only]
    if not code.co_flags & inspect.CO_VARKEYWORDS:
        return tuple(found)
    varkw = code.co_varnames[count + bool(code.co_flags & inspect.CO_VARARGS)]
    for inner in nested_codes(code):  # nested functions read it as a closure variable
        loaded = False
        for ins in dis.get_instructions(inner):
            if loaded and ins.opname == "LOAD_CONST" and ins.argval in worker_only:
                found.append((ins.argval, f"{varkw}[{ins.argval!r}] (line {instruction_line(ins, inner)})"))
            method = ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval in ("get", "pop", "__getitem__")
            loaded = (loaded and method) or (ins.opname.startswith(("LOAD_FAST", "LOAD_DEREF")) and ins.argval == varkw)
    return tuple(found)


def _check_context_use(fn: Callable[..., Any], passed: Collection[str]) -> None:
    """Refuse worker-only context values a step reads, unless the call passes that name itself (a
    ``fit(task="classification")`` reading ``hp["task"]`` reads its own argument)."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    uses = [where for key, where in (_worker_only_reads(code) if code is not None else ()) if key not in passed]
    if uses:
        raise StepOperatorConfigError(
            f"{uses[0]} of {fn.__name__}: that Airflow context value does not exist where a step runs; take the "
            f"values you need as arguments instead (context values a step can receive, by parameter name or "
            f"in its **kwargs: {', '.join(sorted(PORTABLE_CONTEXT_KEYS))})"
        )


class _StepOperatorDecoratedOperator(DecoratedOperator, StepOperator):
    custom_operator_name = "@task.step_operator"
    template_fields: Sequence[str] = StepOperator.template_fields
    template_fields_renderers = StepOperator.template_fields_renderers

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_context_use(python_callable, set(op_kwargs or ()))
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            kwargs_to_upstream={"python_callable": python_callable, "op_args": op_args, "op_kwargs": op_kwargs},
            **kwargs,
        )

    def call_arguments(self, context: Context) -> tuple[list[Any], dict[str, Any]]:
        """op_args/op_kwargs plus the portable context values the function asks for by name, or all of
        them when it takes ``**kwargs`` (as a ``@task`` gets the context there)."""
        kwargs = dict(self.op_kwargs)
        parameters = inspect.signature(self.python_callable).parameters
        wanted = set(parameters)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            wanted |= PORTABLE_CONTEXT_KEYS
        for name in wanted & PORTABLE_CONTEXT_KEYS:
            if name not in kwargs and name in context:
                kwargs[name] = _portable(context[name])  # type: ignore[literal-required]
        return list(self.op_args), kwargs


def _portable(value: Any) -> Any:
    """Plain Python for the remote side: no pendulum, lazy proxies or ParamsDict in the bundle."""
    import datetime as dt

    if hasattr(value, "__wrapped__"):  # lazy_object_proxy
        value = value.__wrapped__
    if isinstance(value, dt.datetime):
        return dt.datetime.fromtimestamp(value.timestamp(), tz=dt.timezone.utc)
    if isinstance(value, Mapping):
        return {k: _portable(v) for k, v in value.items()}
    return value


def step_operator_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """Run the decorated function on a step operator: ``@task.step_operator(step_operator="gpu")``.

    Accepts everything ``StepOperator`` does (``step_operator``, ``settings``, ``resources``,
    ``deferrable``, ``poll_interval``) plus the usual operator arguments (retries, pool, ...).
    """
    if "resources" in kwargs:
        # BaseOperator has an argument of the same name that .expand()/.partial() coerce into Airflow's
        # own Resources; carry ours inside settings so mapping works the same as a plain call
        resources = kwargs.pop("resources")
        settings = dict(kwargs.pop("settings", None) or {})
        if "resources" in settings:
            raise StepOperatorConfigError("resources: given both as resources= and as settings['resources']; give it once")
        if resources is not None:
            from airflow_stepops.settings.step import validate_resources

            settings["resources"] = validate_resources(resources, "resources")
        kwargs["settings"] = settings
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_StepOperatorDecoratedOperator,
        **kwargs,
    )
