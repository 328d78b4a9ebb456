"""``stepops``: list, describe and dry-run step operators.

- ``stepops list``                      registered step operators, flavor, where credentials come from
- ``stepops describe NAME``             a step operator's full configuration (defaults included)
- ``stepops render DAG_ID TASK_ID``     exactly what would be submitted for a task, without submitting
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from airflow_stepops.exceptions import StepOperatorConfigError


def _describe(conn_id: str) -> dict[str, Any]:
    from airflow_stepops.flavors import get_flavor
    from airflow_stepops.hooks.base import load_step_operator_connection, parse_config

    flavor, extras = load_step_operator_connection(conn_id)
    config = parse_config(flavor, conn_id, extras)
    hook = get_flavor(flavor).hook()(step_operator_conn_id=conn_id, config=config)
    info: dict[str, Any] = {
        "name": conn_id,
        "flavor": flavor,
        "connection_type": get_flavor(flavor).conn_type,
        "credentials": config.credentials_source(),
        "artifact_store": str(hook.artifact_root()),
        "config": config.model_dump(mode="json"),
        "settings_class": get_flavor(flavor).settings_class,
        "operator_class": get_flavor(flavor).operator_class,
    }
    if hasattr(hook, "jobs_dir"):
        info["jobs_dir"] = hook.jobs_dir
    return info


def cmd_list(_: argparse.Namespace) -> int:
    from airflow_stepops.hooks.base import registered_step_operators

    known = registered_step_operators()
    if not known:
        print("No step operators registered. Register one, e.g.:\n"
              "  airflow connections add local_step_operator --conn-type stepops_local --conn-extra '{}'")
        return 0
    rows = []
    for conn_id in known:
        try:
            info = _describe(conn_id)
            rows.append((conn_id, info["flavor"], info["credentials"], info["artifact_store"]))
        except StepOperatorConfigError as exc:
            rows.append((conn_id, known[conn_id], f"INVALID: {exc}".splitlines()[0], ""))
    headers = ("NAME", "FLAVOR", "CREDENTIALS FROM", "ARTIFACT STORE")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_describe(ns: argparse.Namespace) -> int:
    print(json.dumps(_describe(ns.name), indent=2))
    return 0


def _placeholder(value: Any) -> Any:
    from airflow.sdk.definitions._internal.mixins import ResolveMixin

    if isinstance(value, ResolveMixin):
        return f"<resolved at run time: {value!r}>"
    if isinstance(value, dict):
        return {k: _placeholder(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_placeholder(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def render_task(dag_id: str, task_id: str, run_id: str = "render", map_index: int = -1,
                try_number: int = 1) -> dict[str, Any]:
    """What ``execute`` would submit for this task; writes and starts nothing."""
    from airflow_stepops.bundle import StepIdentity
    from airflow_stepops.operators.base import StepOperator

    task = _load_task(dag_id, task_id)
    if _is_mapped_step(task):
        map_index = max(map_index, 0)
        task = _unmap_for_render(task, map_index)
    if not isinstance(task, StepOperator):
        raise StepOperatorConfigError(f"task {dag_id}.{task_id} is a {type(task).__name__}, not a step task")
    hook = task.get_hook()
    identity = StepIdentity(dag_id, run_id, task_id, map_index, try_number)
    spec = task.build_spec(hook, identity, refs=[])
    return {
        "dag_id": dag_id,
        "task_id": task_id,
        "step_operator": task.step_operator,
        "flavor": hook.flavor,
        "callable": f"{task.python_callable.__module__}.{task.python_callable.__qualname__}",
        "arguments": {"op_args": _placeholder(task.op_args), "op_kwargs": _placeholder(task.op_kwargs)},
        "settings": task.step_settings.to_json() | {
            f"step_operator.{hook.flavor}": spec.settings.model_dump(mode="json")},
        "bundle_uri": spec.bundle_uri,
        "output_uri": spec.output_uri,
        "request": hook.render(spec),
    }


def _load_task(dag_id: str, task_id: str) -> Any:
    from airflow_stepops._compat import airflow_conf, dagbag_class

    dags_folder = airflow_conf().get("core", "dags_folder")
    if dags_folder not in sys.path:  # as the DAG processor does for a bundle: sibling modules import
        sys.path.append(dags_folder)
    bag = dagbag_class()(dag_folder=dags_folder)
    dag = bag.get_dag(dag_id)
    if dag is None:
        problems = "; ".join(f"{k}: {v.splitlines()[-1]}" for k, v in bag.import_errors.items())
        raise StepOperatorConfigError(
            f"DAG {dag_id!r} not found in {bag.dag_folder}" + (f" (import errors: {problems})" if problems else "")
        )
    if task_id not in dag.task_dict:
        raise StepOperatorConfigError(f"task {task_id!r} not in DAG {dag_id!r}; tasks: {', '.join(dag.task_ids)}")
    task = dag.task_dict[task_id]
    return task


def _is_mapped_step(task: Any) -> bool:
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    from airflow_stepops.operators.base import StepOperator

    return isinstance(task, MappedOperator) and issubclass(task.operator_class, StepOperator)


def _unmap_for_render(task: Any, map_index: int) -> Any:
    """The operator one mapped instance would get; values only known at run time become placeholders."""
    expand = task._get_specified_expand_input().value
    mapped: dict[str, Any] = {}
    for name, values in (expand.items() if isinstance(expand, dict) else []):
        if isinstance(values, (list, tuple)) and map_index < len(values):
            mapped[name] = values[map_index]
        else:
            mapped[name] = f"<mapped at run time: {values!r}[{map_index}]>"
    if getattr(task, "_expand_input_attr", "") == "op_kwargs_expand_input":  # @task.step_operator().expand()
        mapped = {"op_kwargs": {**task.partial_kwargs.get("op_kwargs", {}), **mapped}}
    return task.unmap(mapped)


def cmd_render(ns: argparse.Namespace) -> int:
    print(json.dumps(render_task(ns.dag_id, ns.task_id, ns.run_id, ns.map_index), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list registered step operators").set_defaults(func=cmd_list)
    describe = sub.add_parser("describe", help="show one step operator's configuration")
    describe.add_argument("name", help="connection id of the step operator")
    describe.set_defaults(func=cmd_describe)
    render = sub.add_parser("render", help="print what would be submitted for a task, without submitting")
    render.add_argument("dag_id")
    render.add_argument("task_id")
    render.add_argument("--run-id", default="render")
    render.add_argument("--map-index", type=int, default=-1)
    render.set_defaults(func=cmd_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except StepOperatorConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
