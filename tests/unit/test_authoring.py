"""What a new user meets first: parse-time refusals of step functions that cannot run remotely, and a
quiet task log when a step fails before it was submitted."""

from __future__ import annotations

import pytest

from airflow_stepops.operators.local import LocalStepOperator


def _reads(monkeypatch) -> list[str]:
    from airflow.sdk.execution_time.xcom import XCom

    keys: list[str] = []
    monkeypatch.setattr(XCom, "get_value", lambda *, ti_key, key: keys.append(key) or {"console_url": "u"})
    return keys


def test_the_job_link_reads_no_xcom_when_nothing_was_submitted(monkeypatch):
    # Airflow asks every operator for its links at the end of a try: reading an XCom that was never
    # written logs "XCom not found" at error level after every failure before submit
    keys = _reads(monkeypatch)
    op = LocalStepOperator(task_id="t", python_callable=lambda: 1)
    link = op.operator_extra_links[0]
    assert link.get_link(op, ti_key=None) == "" and keys == []
    op._handle = {"job_id": "j"}
    assert link.get_link(op, ti_key=None) == "u" and keys == ["stepops_job"]


def _declare(fn, **call):
    from airflow.sdk import DAG, task

    with DAG("authoring", schedule=None):
        return task.step_operator(step_operator="local_step_operator")(fn)(**call)


def _generator():
    yield 1


async def _coroutine():
    return 1


async def _async_generator():
    yield 1


@pytest.mark.parametrize(("fn", "what"), [(_generator, "a generator function"), (_async_generator, "a generator"),
                                          (_coroutine, "an async def function")])
@pytest.mark.parametrize("form", ["decorator", "class"])
def test_generators_and_async_steps_are_refused_at_parse_time(fn, what, form):
    from airflow_stepops import StepOperatorConfigError

    with pytest.raises(StepOperatorConfigError, match=rf"python_callable {fn.__name__}: {what}"):
        _declare(fn) if form == "decorator" else LocalStepOperator(task_id="t", python_callable=fn)


def _reads_a_variable_in_a_helper():
    return f"{_helper()}"


def _helper():
    from airflow.sdk import Variable

    return Variable.get("threshold", default=0.5)


def _reads_a_connection_in_an_inner_function():
    from airflow.sdk import BaseHook, Connection

    def password():
        return BaseHook.get_connection("db").password

    return [Connection.get("db") for _ in range(1)], password


def _reads_plain_dicts(options: dict):
    return options.get("Variable"), {"get_connection": 1}.get("get_connection")


@pytest.mark.parametrize(("fn", "found"), [
    (_reads_a_variable_in_a_helper, r"Variable\.get \(line \d+\) in _helper"),
    (_reads_a_connection_in_an_inner_function,
     r"BaseHook\.get_connection \(line \d+\) in password; Connection\.get \(line \d+\) in <listcomp>|"
     r"Connection\.get \(line \d+\) in .*BaseHook\.get_connection \(line \d+\) in password"),
])
def test_reading_airflow_variables_or_connections_is_refused_naming_the_portable_ways(fn, found):
    from airflow_stepops import StepOperatorConfigError

    with pytest.raises(StepOperatorConfigError) as info:
        _declare(fn)
    text = str(info.value)
    assert f"python_callable {fn.__name__} reads Airflow Variables or Connections" in text
    assert __import__("re").search(found, text), text
    assert "{{ var.value.my_var }}" in text and "environment" in text


def test_plain_get_calls_are_not_mistaken_for_airflow_look_ups():
    from airflow_stepops.argcheck import airflow_lookups

    assert airflow_lookups(_reads_plain_dicts) == []
    declared = _declare(_reads_plain_dicts, options={})  # and the task is declared, not refused
    assert declared.operator.python_callable is _reads_plain_dicts


def _context_ti(**context):
    return context["ti"].try_number


def _context_get_dag_run(x, *args, **kwargs):
    def inner():
        return kwargs.get("dag_run")
    return inner()


@pytest.mark.parametrize(("fn", "use"), [(_context_ti, "context['ti']"), (_context_get_dag_run, "kwargs['dag_run']")])
def test_worker_only_values_read_from_kwargs_are_refused_at_parse_time(fn, use):
    from airflow_stepops import StepOperatorConfigError

    with pytest.raises(StepOperatorConfigError, match=rf"{__import__('re').escape(use)} \(line \d+\) of {fn.__name__}: "
                                                      r"that Airflow context value does not exist where a step runs"):
        _declare(fn, **({"x": 1} if fn is _context_get_dag_run else {}))


def test_a_step_taking_kwargs_receives_the_portable_context_values_only():
    def uses_context(n, **context):
        return context["ds"], context.get("params")

    task = _declare(uses_context, n=1).operator
    context = {"ds": "2024-01-02", "params": {"scale": 2}, "ti": object(), "dag_run": object(), "run_id": "r"}
    assert task.call_arguments(context)[0] == []
    kwargs = task.call_arguments(context)[1]
    assert kwargs == {"n": 1, "ds": "2024-01-02", "params": {"scale": 2}, "run_id": "r"}
