"""``stepops``: list, describe and dry-run step operators, and add up what steps cost.

- ``stepops list``                      registered step operators, flavor, where credentials come from
- ``stepops list --check``              the same, and whether each one's service and artifact store answer
- ``stepops describe NAME``             a step operator's full configuration (defaults included)
- ``stepops render DAG_ID TASK_ID``     exactly what would be submitted for a task, and what it may cost
- ``stepops cost [--by run|dag|task|step_operator|day] [--since 7d] [--dag DAG_ID] [--format table|csv|json]``
                                        what steps cost, from the job summaries in the metadata database

``list`` and ``describe`` read configuration only: no network, no cloud SDK, and Airflow itself only when
connections live somewhere other than environment variables and the metadata database (a secrets
backend), so they answer in about a second. ``render``, ``cost`` and ``list --check`` need Airflow.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from airflow_stepops import _cli_connections as conns
from airflow_stepops._cli_connections import CliError


def home_problem(environ: os._Environ[str] | dict[str, str] = os.environ) -> str | None:
    """Why this process cannot read an Airflow installation; checked before anything imports Airflow,
    which creates ``~/airflow`` (and a database) when AIRFLOW_HOME is unset."""
    home = environ.get("AIRFLOW_HOME")
    demo = "after `make demo`, from the project root: export AIRFLOW_HOME=$PWD/.airflow/demo"
    if home is None and not os.path.isdir(os.path.expanduser("~/airflow")):
        return (f"AIRFLOW_HOME is not set and ~/airflow does not exist: stepops reads an existing Airflow "
                f"installation and does not create one. Point AIRFLOW_HOME at yours ({demo}).")
    if home is not None and not os.path.isdir(os.path.expanduser(home)):
        return f"AIRFLOW_HOME={home} does not exist ({demo})."
    return None


# ---- list / describe: configuration only ----------------------------------------------------------
#: what a flavor's client uses when its credential connection does not exist (read in its hook)
_MISSING_CONN_FALLBACK = {
    "sagemaker": ("aws_conn_id", "the default AWS credential chain (environment, ~/.aws, instance role)"),
    "azureml": ("azure_conn_id", "DefaultAzureCredential (environment, managed identity, az login)"),
    "vertex": ("gcp_conn_id", None),
    "modal": ("modal_conn_id", "Modal's own token (MODAL_TOKEN_ID / ~/.modal.toml)"),  # for modal_default only
    "kubernetes": ("kubernetes_conn_id", None),
}


def _credentials(flavor: str, config: Any, registry: conns.Registry) -> str:
    """``credentials_source()``, with the credential connection it names checked: a missing one is named
    with what is used instead (or that steps fail)."""
    text = str(config.credentials_source())
    field, fallback = _MISSING_CONN_FALLBACK.get(flavor, (None, None))
    conn_id = getattr(config, field, None) if field else None
    if not conn_id or registry.exists(conn_id):
        return text
    if flavor == "modal" and conn_id != "modal_default":  # the modal provider's hook: only its default is optional
        fallback = None
    instead = f"{fallback}: no connection {conn_id!r}" if fallback else f"connection {conn_id!r} does not exist: steps fail"
    return re.sub(rf"\w+ connection {re.escape(repr(conn_id))}", lambda _: instead, text, count=1)


def _artifact_store(flavor: str, config: Any) -> str:
    if config.artifact_store:
        return str(config.artifact_store)
    if flavor in ("local", "kubernetes", "modal"):  # the default store under AIRFLOW_HOME (artifacts.default_local_store)
        return "file://" + os.path.join(conns.airflow_home(), "stepops", "artifacts")
    return "(none: required)"


def describe(conn_id: str, registry: conns.Registry | None = None) -> dict[str, Any]:
    """A step operator's configuration, validated, from its connection alone."""
    from pydantic import ValidationError

    from airflow_stepops.flavors import flavor_for_conn_type
    from airflow_stepops.settings.base import format_validation_error

    registry = registry or conns.Registry.load()
    found = registry.get(conn_id)
    if found is None:
        known = registry.step_operators()
        listed = ", ".join(f"{k} ({v})" for k, v in known.items()) or "none"
        raise CliError(f"no step operator {conn_id!r}; registered step operators: {listed}")
    conn_type, extras = found
    flavor = flavor_for_conn_type(conn_type)
    if flavor is None:
        raise CliError(f"connection {conn_id!r} has type {conn_type!r}, not a step operator type (stepops_<flavor>)")
    try:
        config = flavor.config_model().model_validate(extras)
    except ValidationError as err:
        raise CliError(format_validation_error(err, f"connection {conn_id!r} ({conn_type}) extra")) from None
    info: dict[str, Any] = {
        "name": conn_id,
        "flavor": flavor.name,
        "connection_type": conn_type,
        "credentials": _credentials(flavor.name, config, registry),
        "artifact_store": _artifact_store(flavor.name, config),
        "config": config.model_dump(mode="json"),
        "settings_class": flavor.settings_class,
        "operator_class": flavor.operator_class,
    }
    if flavor.name == "local":  # as LocalStepOperatorHook.jobs_dir
        jobs_dir = getattr(config, "jobs_dir", None)
        info["jobs_dir"] = (os.path.abspath(os.path.expanduser(jobs_dir)) if jobs_dir
                            else os.path.join(conns.airflow_home(), "stepops", "local", "jobs"))
    return info


def check(conn_id: str, registry: conns.Registry) -> str:
    """Reach the backend as a step would: its artifact store, and one read of the service's job API (a
    look-up of a job that does not exist). Needs Airflow and the flavor's client library."""
    from airflow_stepops.bundle import StepIdentity

    started = time.monotonic()
    try:
        hook = _hook(conn_id, registry)
        hook.check_store()
        hook.artifact_root().exists()
        hook.find_job(StepIdentity("stepops-check", "stepops-check", "stepops-check", -1, 1))
    except Exception as exc:
        return "unreachable: " + (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    return f"ok ({time.monotonic() - started:.1f} s)"


def _hook(conn_id: str, registry: conns.Registry, flavor: str | None = None) -> Any:
    """A step operator's hook, its connection read as ``describe`` reads it (not through Airflow's
    ``get_connection``, which warns about the ``_`` of every ``stepops_*`` type: docs/decisions/connections-and-cli.md)."""
    from airflow_stepops.connections import flavor_and_extras, parse_config
    from airflow_stepops.flavors import get_flavor

    found = registry.get(conn_id)
    if found is None:
        raise CliError(f"no connection {conn_id!r}")
    name, extras = flavor_and_extras(conn_id, found[0], found[1], flavor)
    return get_flavor(name).hook()(step_operator_conn_id=conn_id, config=parse_config(name, conn_id, extras))


def cmd_list(ns: argparse.Namespace) -> int:
    registry = conns.Registry.load()
    known = registry.step_operators()
    if not known:
        print(f"No step operators registered in {conns.airflow_home()}. Register one, e.g.:\n"
              "  airflow connections add local_step_operator --conn-type stepops_local --conn-extra '{}'")
        return 0
    headers = ("NAME", "FLAVOR", "CREDENTIALS FROM", "ARTIFACT STORE") + (("REACHABLE",) if ns.check else ())
    rows: list[tuple[str, ...]] = []
    for conn_id, flavor in known.items():
        try:
            info = describe(conn_id, registry)
            row: tuple[str, ...] = (conn_id, flavor, info["credentials"], info["artifact_store"])
        except CliError as exc:
            row = (conn_id, flavor, f"INVALID: {exc}".splitlines()[0], "")
        rows.append(row + ((check(conn_id, registry) if not row[2].startswith("INVALID") else "",) if ns.check else ()))
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_describe(ns: argparse.Namespace) -> int:
    print(json.dumps(describe(ns.name), indent=2))
    return 0


# ---- render: loads the DAG ------------------------------------------------------------------------
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
    from airflow_stepops.exceptions import StepOperatorConfigError
    from airflow_stepops.operators.base import StepOperator

    task = _load_task(dag_id, task_id)
    if _is_mapped_step(task):
        map_index = max(map_index, 0)
        task = _unmap_for_render(task, map_index)
    if not isinstance(task, StepOperator):
        raise StepOperatorConfigError(f"task {dag_id}.{task_id} is a {type(task).__name__}, not a step task")
    identity = StepIdentity(dag_id, run_id, task_id, map_index, try_number)
    candidates = [_candidate(task, _hook_for(task, conn_id), identity) for conn_id in task.step_operators]
    first = candidates[0]
    return {
        "dag_id": dag_id,
        "task_id": task_id,
        "step_operator": task.step_operator,
        "flavor": first["flavor"],
        "callable": f"{task.python_callable.__module__}.{task.python_callable.__qualname__}",
        "arguments": {"op_args": _placeholder(task.op_args), "op_kwargs": _placeholder(task.op_kwargs)},
        "settings": task.step_settings.to_json() | {
            f"step_operator.{c['flavor']}": c.pop("settings") for c in candidates},
        **{k: v for k, v in first.items() if k not in ("step_operator", "flavor")},
        **({"candidates": candidates} if len(candidates) > 1 else {}),
    }


def _candidate(task: Any, hook: Any, identity: Any) -> dict[str, Any]:
    """One step operator of the task: what its first attempt submits and costs and, when a preemption can escalate
    the step to on-demand capacity there, what that attempt submits and costs."""

    spec = task.build_spec(hook, identity, refs=[], priced=True)
    image = hook.image(spec)
    found = {"step_operator": hook.step_operator_conn_id, "flavor": hook.flavor,
             "settings": spec.settings.model_dump(mode="json"), "bundle_uri": spec.bundle_uri,
             "output_uri": spec.output_uri, "image": image,
             "install": hook.install_plan(spec, task.requirements_text(hook.flavor)) if image else None,
             "request": hook.render(spec), "cost": _cost(task, hook, spec)}
    policy = task.policy(hook)
    if policy.on_demand_after(policy.retries, hook.spot(spec)):
        escalated = task.build_spec(hook, identity.with_attempt(policy.retries + 1), refs=[],
                                    preemptions=policy.retries, priced=True)
        found["on_demand_request"] = hook.render(escalated)
        found["on_demand_cost"] = _cost(task, hook, escalated)
    return found


def _cost(task: Any, hook: Any, spec: Any) -> dict[str, Any]:
    """The attempt's estimate and, under ``max_cost``, whether the step fits in it (what ``execute`` would refuse)."""
    from airflow_stepops.cost import estimate

    found = estimate(hook, spec)
    limit = task.policy(hook).max_cost
    if limit is not None:
        try:
            task.check_cost(hook, spec)
            found["max_cost"] = {"limit": limit, "runtime_within_seconds": spec.cost_seconds}
        except Exception as exc:  # StepCostLimitError: shown, as execute would raise it
            found["max_cost"] = {"limit": limit, "refused": str(exc)}
    return found


def _hook_for(task: Any, conn_id: str) -> Any:
    """The hook of one of the task's step operators, its connection read as ``describe`` reads it (Airflow's own
    look-up is the fallback)."""
    registry = conns.Registry.load()
    hooks = task.__dict__.setdefault("_hooks", {})
    if conn_id not in hooks and registry.exists(conn_id):
        hooks[conn_id] = _hook(conn_id, registry, task.flavor)
    return task.get_hook(conn_id)


def _dag_files(folder: str, dag_id: str) -> list[str]:
    """The DAG folder's files that name ``dag_id``, found as the DAG processor finds files
    (``.airflowignore`` honoured): parsed first, so rendering one task does not parse every DAG (the whole
    folder is the fallback)."""
    from airflow.utils.file import list_py_file_paths

    found = []
    for path in list_py_file_paths(folder):
        with open(path, encoding="utf-8", errors="replace") as fh:
            if dag_id in fh.read():
                found.append(path)
    return found


def _load_task(dag_id: str, task_id: str) -> Any:
    from airflow_stepops._compat import airflow_conf, dagbag_class
    from airflow_stepops.exceptions import StepOperatorConfigError

    dags_folder = airflow_conf().get("core", "dags_folder")
    if dags_folder not in sys.path:  # as the DAG processor does for a bundle: sibling modules import
        sys.path.append(dags_folder)
    dag, bag = None, None
    for source in [*_dag_files(dags_folder, dag_id), dags_folder]:
        bag = dagbag_class()(dag_folder=source)
        dag = bag.get_dag(dag_id)
        if dag is not None:
            break
    if dag is None:
        problems = "; ".join(f"{k}: {v.splitlines()[-1]}" for k, v in bag.import_errors.items()) if bag else ""
        raise StepOperatorConfigError(
            f"DAG {dag_id!r} not found in {dags_folder}" + (f" (import errors: {problems})" if problems else "")
        )
    if task_id not in dag.task_dict:
        raise StepOperatorConfigError(f"task {task_id!r} not in DAG {dag_id!r}; tasks: {', '.join(dag.task_ids)}")
    return dag.task_dict[task_id]


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
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")  # not Airflow's INFO lines on parsing
    print(json.dumps(render_task(ns.dag_id, ns.task_id, ns.run_id, ns.map_index), indent=2, default=str))
    return 0


def cmd_cost(ns: argparse.Namespace) -> int:
    from airflow_stepops import ledger

    try:
        since = ledger.parse_since(ns.since) if ns.since else None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    rows = ledger.ledger(list(ledger.charges(ns.dag, since)), ns.by)
    print(ledger.render(rows, ns.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list registered step operators (configuration only)")
    listing.add_argument("--check", action="store_true",
                         help="also reach each backend (artifact store, job API) and report whether it answers")
    listing.set_defaults(func=cmd_list)
    describe_ = sub.add_parser("describe", help="show one step operator's configuration")
    describe_.add_argument("name", help="connection id of the step operator")
    describe_.set_defaults(func=cmd_describe)
    render = sub.add_parser("render", help="print what would be submitted for a task, without submitting")
    render.add_argument("dag_id")
    render.add_argument("task_id")
    render.add_argument("--run-id", default="render")
    render.add_argument("--map-index", type=int, default=-1)
    render.set_defaults(func=cmd_render)
    cost = sub.add_parser("cost", help="what steps cost, per DAG run, DAG, task, step operator or day")
    cost.add_argument("--by", choices=["run", "dag", "task", "step_operator", "day"], default="run",
                      help="the grouping (default: run)")
    cost.add_argument("--since", help="charges of attempts that ended since: 2026-12-01, 2026-12-01T08:00, 7d, 12h")
    cost.add_argument("--dag", help="one DAG's steps only")
    cost.add_argument("--format", choices=["table", "csv", "json"], default="table")
    cost.set_defaults(func=cmd_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    problem = home_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return int(ns.func(ns))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        config_error = getattr(sys.modules.get("airflow_stepops.exceptions"), "StepOperatorConfigError", ())
        if config_error and isinstance(exc, config_error):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
