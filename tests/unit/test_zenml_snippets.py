"""Every snippet of ZenML's step-operator page (zenml_step_operators.txt, the page users come from) works here.

The page is parsed, not copied: each Python snippet runs as printed, with ``zenml`` imports served by
modules that map them onto ours (``@step(step_operator=..., settings=...)`` is ``@task.step_operator``
declared in a DAG, ``@pipeline`` a DAG built at once, ``zenml.config``/``zenml.integrations...`` our
settings). Each snippet's settings must validate and mean what ZenML means, or fail with an error that
gives the fix. Shell snippets register step operators; their Airflow equivalents are connections.
"""

from __future__ import annotations
import __future__

import ast
import inspect
import os
import re
import shlex
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_stepops import ResourceSettings, StepOperatorConfigError
from airflow_stepops.flavors import FLAVORS
from airflow_stepops.settings.base import BaseStepOperatorSettings

PAGE = Path(__file__).with_name("zenml_step_operators.txt")
ROOT = Path(__file__).resolve().parents[2]
#: a line that starts a code block on the page (the page is plain text: no fences)
CODE_START = re.compile(r"^(from |import |@|#|def |for |[A-Za-z_][\w.]*(\[[^\]]*\])? = |(zenml|aws|gcloud|az|modal) )")
SHELL = re.compile(r"^(zenml|aws|gcloud|az|modal) ")
#: where ZenML's modules live here; zenml.client has no counterpart (Airflow's own UI/API show runs)
MODULES = {"zenml": __name__, "zenml.config": "airflow_stepops", "zenml.integrations": "airflow_stepops.settings"}


def docs_text() -> str:
    """What a user reads: the README and every page of docs/ (where the equivalents are documented)."""
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])


@dataclass(frozen=True)
class Snippet:
    number: int
    title: str
    code: str

    @property
    def shell(self) -> bool:
        return all(SHELL.match(line) for line in self.code.splitlines() if line.strip() and line[0] not in " #")


def snippets() -> list[Snippet]:
    """Code blocks: from a line that starts code to the first prose line (not blank, indented or code)."""
    out: list[Snippet] = []
    title, block = "", None
    for line in [*PAGE.read_text().splitlines(), "END"]:
        if block is not None and (not line.strip() or line[0] in " \t)]}" or CODE_START.match(line)):
            block.append(line)
            continue
        if block is not None:
            out.append(Snippet(len(out) + 1, title, "\n".join(block).strip() + "\n"))
            block = None
        if CODE_START.match(line):
            block = [line]
        elif line.strip():
            title = line.strip().rstrip(":").split(". ")[-1]
    return out


PYTHON = [s for s in snippets() if not s.shell]
SHELLS = [s for s in snippets() if s.shell]


# ---- the zenml names, mapped ----------------------------------------------------------------------
DECLARED: list[Any] = []


def step(func: Any = None, *, step_operator: str | None = None, settings: dict[str, Any] | None = None) -> Any:
    """ZenML's ``@step``: bare, a normal task; with a step operator, ``@task.step_operator`` — declared once
    in a DAG of its own right away, so its settings are validated as a DAG file's are."""
    from airflow.sdk import DAG, task

    if func is not None:
        return task(func)

    def wrap(fn: Any) -> Any:
        decorated = task.step_operator(step_operator=step_operator, settings=settings)(fn)
        with DAG(f"snippet_{fn.__name__}", schedule=None):
            DECLARED.append(decorated(*[None] * len(inspect.signature(fn).parameters)).operator)
        return decorated

    return wrap


def pipeline(func: Any) -> Any:
    """ZenML's ``@pipeline``: the DAG, built when the snippet runs (ZenML builds it when called)."""
    from airflow.sdk import dag

    built = dag(dag_id=func.__name__, schedule=None)(func)()
    DECLARED.append(built)
    return built


def _zenml_modules(code: str) -> dict[str, types.ModuleType]:
    """A module for every ``zenml...`` import of the snippet (and its parents), delegating to ours."""
    from importlib import import_module

    modules: dict[str, types.ModuleType] = {}
    for node in ast.walk(ast.parse(code)):
        name = getattr(node, "module", None) or ""
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            dotted = ".".join(parts[:i])
            target = next((MODULES[p] for p in (dotted, ".".join(parts[:2])) if p in MODULES), None)
            if not dotted.startswith("zenml") or dotted in modules:
                continue
            module = types.ModuleType(dotted)
            module.__path__ = []  # a package, so submodules import
            if target is not None:
                module.__getattr__ = lambda attr, _t=target: getattr(import_module(_t), attr)  # type: ignore
            modules[dotted] = module
    return modules


def run(snippet: Snippet, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run a snippet as printed; the page's earlier imports are in scope, as on the page."""
    import airflow_stepops.settings as ours

    for name, module in _zenml_modules(snippet.code).items():
        monkeypatch.setitem(sys.modules, name, module)
    tree = ast.parse(snippet.code)
    annotations = {n.id for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   for a in [f.returns, *(x.annotation for x in f.args.args)] if a for n in ast.walk(a)
                   if isinstance(n, ast.Name)}
    namespace: dict[str, Any] = {"step": step, "pipeline": pipeline,
                                 **{name: getattr(ours, name) for name in ours.__all__}}
    namespace.update({name: Any for name in annotations})  # the page's example types (Model, Data, ...)
    DECLARED.clear()
    environ = dict(os.environ)
    try:
        exec(compile(snippet.code, f"<snippet {snippet.number}>", "exec",
                     flags=__future__.annotations.compiler_flag, dont_inherit=True), namespace)
    finally:
        os.environ.clear()
        os.environ.update(environ)
    return namespace


def _flavor_settings(namespace: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump(exclude_defaults=True) for k, v in namespace.items()
            if isinstance(v, BaseStepOperatorSettings)}


def _steps() -> dict[str, tuple[str, dict[str, Any]]]:
    """task id -> (step operator, settings as parsed), for the steps the snippet declared."""
    return {op.task_id: (op.step_operator, op.step_settings.to_json()) for op in DECLARED if hasattr(op, "step_settings")}


K8S_GPU = {"resources": {"cpu_count": 8, "memory": "32GB", "gpu_count": 1}}
#: what each Python snippet means here: its flavor settings and declared steps, or the error it must give
EXPECTED: dict[int, dict[str, Any]] = {
    3: {"steps": {"gpu_training_step": ("k8s_step_operator", K8S_GPU)}, "dags": ["training_pipeline"]},
    6: {"settings": {"sagemaker_settings": {"instance_type": "ml.p3.2xlarge", "max_runtime_in_seconds": 3600,
                                            "use_spot_instances": True}},
        "steps": {"train_on_sagemaker": ("sagemaker_step_operator", {"step_operator.sagemaker": {
            "instance_type": "ml.p3.2xlarge", "max_runtime_in_seconds": 3600, "use_spot_instances": True}})}},
    9: {"settings": {"vertex_settings": {"machine_type": "n1-standard-8", "accelerator_type": "NVIDIA_TESLA_V100",
                                         "accelerator_count": 2}}, "steps": {"train_on_vertex": ("vertex_step_operator",
                                                                                                 {})}},
    15: {"settings": {"modal_settings": {"gpu": "any", "cpu": 4.0, "memory": 16384}},
        "steps": {"train_on_modal": ("modal_step_operator", {})}},
    16: {"steps": {"resource_intensive_step": ("k8s_step_operator", {"resources": {
        "cpu_count": 8, "memory": "32GB", "gpu_count": 2}})}},
    17: {"settings": {"settings": {"instance_type": "ml.p3.8xlarge", "max_runtime_in_seconds": 7200,
                                  "volume_size_in_gb": 100, "use_spot_instances": True,
                                  "max_wait_time_in_seconds": 86400}}},
    # Vertex cannot attach an A100 to an N1 machine: the error names the machine types that carry one
    18: {"error": r"accelerator_type=NVIDIA_TESLA_A100 cannot be attached to n1-highmem-8; machine types for "
                 r"NVIDIA_TESLA_A100: a2-highgpu-1g, "},
    19: {"steps": {"train_model": ("sagemaker_step_operator", {}), "generate_explanations": ("modal_step_operator", {})},
        "dags": ["mixed_pipeline"]},
    20: {"steps": {"train_deep_learning_model": ("sagemaker_step_operator", {}),
                  "load_csv": ("sagemaker_step_operator", {})}},
    21: {"steps": {"process_large_dataset": ("vertex_step_operator", {}),
                   "process_small_preprocessed_data": ("vertex_step_operator", {})}},
    # a wait without spot is unused by SageMaker: dropped, with a warning saying so
    22: {"settings": {"settings": {"max_runtime_in_seconds": 3600}},
         "warning": r"max_wait_time_in_seconds=7200 is ignored: SageMaker only uses it with use_spot_instances=True"},
    # a spot wait alone bounds the runtime too (SageMaker needs MaxWaitTimeInSeconds >= MaxRuntimeInSeconds)
    23: {"settings": {"sagemaker_settings": {"instance_type": "ml.p3.2xlarge", "use_spot_instances": True,
                                             "max_wait_time_in_seconds": 3600, "max_runtime_in_seconds": 3600},
                      "vertex_settings": {"machine_type": "n1-standard-8", "use_preemptible": True}}},
    # ZenML's own client: runs are Airflow's (docs/writing-steps.md: "Coming from ZenML")
    24: {"error": r"cannot import name 'Client' from 'zenml.client'", "readme": "airflow tasks states-for-dag-run"},
    # runs (it sets a variable nothing here reads); Airflow's logging level is the counterpart
    28: {"settings": {}, "readme": "AIRFLOW__LOGGING__LOGGING_LEVEL"},
    29: {"settings": {"sagemaker_settings": {"use_spot_instances": True, "max_wait_time_in_seconds": 3600,
                                             "max_runtime_in_seconds": 3600},
                      "vertex_settings": {"use_preemptible": True}}},
    30: {"settings": {"settings": {"instance_type": "ml.m5.xlarge"}}},
    31: {"settings": {"settings": {"max_runtime_in_seconds": 3600}}},
}


def test_the_page_is_parsed_into_every_snippet():
    assert [s.number for s in PYTHON] == sorted(EXPECTED), [(s.number, s.title) for s in PYTHON]
    assert len(SHELLS) == 14 and sum(s.code.count("\n") for s in snippets()) > 200
    for snippet in PYTHON:
        ast.parse(snippet.code)  # whole statements, nothing cut off


@pytest.mark.parametrize("snippet", PYTHON, ids=lambda s: f"{s.number:02d}-{s.title}")
def test_python_snippet_works_as_printed(snippet, monkeypatch):
    expected = EXPECTED[snippet.number]
    assert expected.get("readme", "") in docs_text()
    if "error" in expected:
        with pytest.raises((StepOperatorConfigError, ValueError, ImportError), match=expected["error"]):
            run(snippet, monkeypatch)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace = run(snippet, monkeypatch)
    ours = [str(w.message) for w in caught if "airflow_stepops" in w.filename or "max_wait" in str(w.message)]
    assert [m for m in ours if re.match(expected.get("warning", "^$"), m)] == ours
    assert bool(ours) == ("warning" in expected)
    if "settings" in expected:
        assert _flavor_settings(namespace) == expected["settings"]
    for task_id, (conn, wanted) in expected.get("steps", {}).items():
        got_conn, parsed = _steps()[task_id]
        assert got_conn == conn
        for key, value in wanted.items():
            assert {k: parsed[key].get(k) for k in value} == value
    assert [d.dag_id for d in DECLARED if not hasattr(d, "step_settings")] == expected.get("dags", [])


def test_the_vertex_example_that_vertex_refuses_works_with_the_named_fix():
    """Snippet 18 with the machine type its error names: a valid A100 machine with ZenML's disk."""
    from airflow_stepops.settings import VertexStepOperatorSettings

    fixed = VertexStepOperatorSettings(machine_type="a2-highgpu-1g", accelerator_type="NVIDIA_TESLA_A100",
                                       accelerator_count=1, disk_size_gb=200)
    assert fixed.machine_for(ResourceSettings()).describe().startswith("a2-highgpu-1g")


@pytest.mark.parametrize("snippet", SHELLS, ids=lambda s: f"{s.number:02d}-{s.title}")
def test_shell_snippet_has_its_airflow_equivalent(snippet):
    """``zenml step-operator register NAME --flavor=F --k=v`` is a ``stepops_F`` connection NAME whose extras
    take the same names (and, for real values, validate); other zenml commands have a documented counterpart."""
    readme = docs_text()
    command = " ".join(line.rstrip("\\").strip() for line in snippet.code.splitlines()
                       if line.strip() and not line.startswith("#"))
    for zenml in re.findall(r"zenml [^#]*?(?=zenml |$)", command):
        words = shlex.split(zenml)
        if words[1:3] == ["step-operator", "register"]:
            options = dict(w[2:].split("=", 1) for w in words[4:])
            flavor = FLAVORS[options.pop("flavor")]
            assert f"airflow connections add {words[3]} --conn-type {flavor.conn_type}" in readme
            config = flavor.config_model()
            assert set(options) <= set(config.model_fields), set(options) - set(config.model_fields)
            real = {k: int(v) if v.isdigit() else v for k, v in options.items() if not v.startswith("<")}
            required = {"role": "arn:aws:iam::123456789012:role/x", "location": "us-central1",
                        "subscription_id": "00000000-0000-0000-0000-000000000000", "resource_group": "rg",
                        "workspace_name": "ml-ws"}
            config(**{**{k: v for k, v in required.items() if k in config.model_fields}, **real})
        elif words[1:3] == ["integration", "install"]:
            assert f"pip install airflow-stepops[{ {'kubernetes': 'kubernetes'}.get(words[3], words[3]) }]" in readme
        else:
            equivalent = {"step-operator list": "stepops list", "step-operator describe": "stepops describe"}
            assert equivalent[" ".join(words[1:3])] in readme
    if snippet.code.startswith("modal token new"):
        assert "`modal token new` on the workers" in readme
