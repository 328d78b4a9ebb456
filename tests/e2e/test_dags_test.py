"""``airflow dags test`` end to end: the mixed example pipeline, mapping and ``multiple_outputs``.

Each DAG runs once per session in a real ``airflow dags test`` subprocess against the session's
SQLite DB; the tests then read states and XComs straight from that DB and check the files the
steps left (job directories, artifacts).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow

ARTIFACT_REF_CLASS = "airflow_stepops.artifacts.ArtifactRef"


def _file_path(uri: str) -> Path:
    parsed = urlparse(uri)
    assert parsed.scheme == "file", uri
    return Path(parsed.path)


def _job_dir(airflow_env, job_info: dict) -> Path:
    job_dir = airflow_env.jobs_dir / job_info["job_id"]
    assert job_dir.is_dir(), f"no job directory {job_dir}"
    return job_dir


# ---------------------------------------------------------------------------------------------
# the mixed example pipeline (dags_examples/mixed_pipeline.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_run(dags_test):
    return dags_test("mixed_pipeline")


@pytest.mark.timeout(420)
def test_mixed_pipeline_runs_with_dags_test(airflow_env, mixed_run):
    af, run_id = airflow_env, mixed_run.run_id
    assert mixed_run.returncode == 0, mixed_run.output_tail()
    assert af.dag_run("mixed_pipeline", run_id)["state"] == "success"
    states = {task_id: ti["state"] for (task_id, _), ti in af.task_instances("mixed_pipeline", run_id).items()}
    assert states == dict.fromkeys(
        ["load_data", "preprocess", "train_model", "generate_explanations", "save_results"], "success")

    # train_model: the model is not JSON, so XCom carries an ArtifactRef to the stored pickle
    ref = af.xcom("mixed_pipeline", run_id, "train_model")
    assert ref["__classname__"] == ARTIFACT_REF_CLASS, ref
    data = ref["__data__"]
    model_file = _file_path(data["uri"])
    assert model_file.is_relative_to(af.home / "stepops" / "artifacts" / "mixed_pipeline")
    assert model_file.parts[-4] == "-1" and re.fullmatch(r"try-1-[0-9a-f]{12}", model_file.parts[-3])
    assert model_file.parts[-2:] == ("output", "return_value.pkl")
    assert data["type"].endswith("LinearModel"), data
    blob = model_file.read_bytes()
    assert data["size"] == len(blob)
    assert data["sha256"] == hashlib.sha256(blob).hexdigest()

    # train_model really ran as a local step job, with its resource settings applied
    job = af.xcom("mixed_pipeline", run_id, "train_model", key="stepops_job")
    assert (job["flavor"], job["step_operator"]) == ("local", "local_step_operator")
    job_dir = _job_dir(af, job)
    assert json.loads((job_dir / "status.json").read_text())["state"] == "succeeded"
    spec = json.loads((job_dir / "spec.json").read_text())
    assert spec["identity"]["run_id"] == run_id
    assert job["memory_limit_bytes"] == spec["memory_limit_bytes"] > 0
    assert len(job["cpu_ids"]) == 1
    assert "trained on 400 rows" in (job_dir / "step.log").read_text()

    # generate_explanations: a plain dict result, inline in XCom, computed in the step's process
    explanations = af.xcom("mixed_pipeline", run_id, "generate_explanations")
    importance = explanations["importance"]
    assert set(importance) == {"size", "age", "noise"}
    assert sum(importance.values()) == pytest.approx(1.0, abs=1e-3)
    assert importance["size"] > importance["age"] > importance["noise"]
    expl_job_dir = _job_dir(af, af.xcom("mixed_pipeline", run_id, "generate_explanations", key="stepops_job"))
    assert explanations["explained_on_pid"] == json.loads((expl_job_dir / "child.json").read_text())["pid"]

    # save_results (a normal task) loaded the model through the ref: weights close to the truth
    results = af.xcom("mixed_pipeline", run_id, "save_results")
    assert results["weights"] == pytest.approx([3.0, -2.0, 0.5], abs=0.05)
    assert results["bias"] == pytest.approx(1.0, abs=0.1)
    assert results["model_artifact"] == data["uri"]
    assert results["importance"] == importance


# ---------------------------------------------------------------------------------------------
# mapping and multiple_outputs (tests/e2e/dags/e2e_mapped_dags.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mapped_run(dags_test):
    return dags_test("stepops_e2e_mapped")


@pytest.mark.timeout(420)
def test_expand_mapped_step_task(airflow_env, mapped_run):
    af, run_id = airflow_env, mapped_run.run_id
    tis = af.task_instances("stepops_e2e_mapped", run_id)
    squares = {index: ti for (task_id, index), ti in tis.items() if task_id == "square"}
    assert sorted(squares) == [0, 1, 2], mapped_run.output_tail()
    assert {ti["state"] for ti in squares.values()} == {"success"}, mapped_run.output_tail()

    pids, job_dirs = set(), set()
    for index, x in enumerate([1, 2, 3]):
        value = af.xcom("stepops_e2e_mapped", run_id, "square", map_index=index)
        assert value["x"] == x and value["square"] == x * x + 100  # partial(offset=100) + expand(x=...)
        assert value["run_id"] == run_id  # a portable context value, filled in per mapped instance
        pids.add(value["pid"])
        dirs = af.job_dirs("stepops_e2e_mapped", run_id, "square", map_index=index)
        assert len(dirs) == 1 and f"-m{index}-t1-" in dirs[0].name, dirs
        job_dirs.add(dirs[0])
    assert len(pids) == 3 and len(job_dirs) == 3  # one remote job per mapped task instance

    assert tis[("collect", -1)]["state"] == "success"
    assert af.xcom("stepops_e2e_mapped", run_id, "collect") == [101, 104, 109]


@pytest.mark.timeout(420)
def test_step_task_with_keyword_arguments(airflow_env, mapped_run):
    af, run_id = airflow_env, mapped_run.run_id
    assert af.ti("stepops_e2e_mapped", run_id, "kw_step")["state"] == "success", mapped_run.output_tail()
    assert af.xcom("stepops_e2e_mapped", run_id, "kw_step") == "1-two"


@pytest.mark.timeout(420)
def test_multiple_outputs_step_task(airflow_env, mapped_run):
    af, run_id = airflow_env, mapped_run.run_id
    assert af.ti("stepops_e2e_mapped", run_id, "stats")["state"] == "success", mapped_run.output_tail()
    xcoms = af.xcoms("stepops_e2e_mapped", run_id, "stats")
    # one XCom per key, as for @task(multiple_outputs=True), plus the whole dict
    assert (xcoms["total"], xcoms["count"], xcoms["maximum"]) == (12, 3, 6)
    assert xcoms["return_value"] == {"total": 12, "count": 3, "maximum": 6}
    assert xcoms["stepops_job"]["flavor"] == "local"
    # downstream tasks read the outputs key by key
    assert af.ti("stepops_e2e_mapped", run_id, "report")["state"] == "success"
    assert af.xcom("stepops_e2e_mapped", run_id, "report") == [12, 3, 6]
