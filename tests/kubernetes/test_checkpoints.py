"""STEPOPS_CHECKPOINT_DIR on Kubernetes: a directory on a PersistentVolumeClaim that every try of one task
instance of one run shares, so the retry of a preempted step resumes from what it wrote."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

pytest.importorskip("kubernetes")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from airflow_stepops.artifacts import local_path, store_path  # noqa: E402
from airflow_stepops.bundle import StepIdentity, read_outcome  # noqa: E402
from airflow_stepops.connections import parse_config  # noqa: E402
from airflow_stepops.exceptions import StepOperatorConfigError  # noqa: E402
from airflow_stepops.hooks import kubernetes_job as manifest  # noqa: E402
from airflow_stepops.resources import ResourceSettings  # noqa: E402
from airflow_stepops.runtime.protocol import Env  # noqa: E402
from airflow_stepops.settings.kubernetes import (  # noqa: E402
    KubernetesStepOperatorConfig,
    KubernetesStepOperatorSettings,
)

from ..flavorjobs import connection_like, hook_maker, make_spec, run_trigger  # noqa: E402

make_hook = hook_maker("kubernetes")

NS = "steps"
CLAIM = "step-checkpoints"
STORE = {"artifact_store": "pvc://step-data/artifacts", "worker_artifact_path": "/mnt/step-data"}


def _identity(try_number: int = 1, run_key: str = "k1", map_index: int = -1) -> StepIdentity:
    return StepIdentity("train_dag", "manual__2025-01-01T00:00:00+00:00", "train", map_index, try_number, run_key)


def _job(config: KubernetesStepOperatorConfig, identity: StepIdentity) -> dict:
    job = manifest.build_job(identity=identity, config=config, settings=KubernetesStepOperatorSettings(),
                             options=config, resources=ResourceSettings(), image="python:3", transport_env=[])
    kubernetes_validate.validate(job, "1.33", strict=True)
    return job


def _pod(job: dict) -> tuple[dict, dict[str, str]]:
    pod = job["spec"]["template"]["spec"]
    return pod, {e["name"]: e["value"] for e in pod["containers"][0]["env"]}


# ---- the manifest --------------------------------------------------------------------------------
def test_a_pvc_store_holds_the_checkpoints_beside_the_try_directories():
    config = KubernetesStepOperatorConfig(**STORE)
    first, env = _pod(_job(config, _identity(1)))
    assert env[Env.CHECKPOINT_DIR] == (f"{manifest.STORE_MOUNT}/train_dag/manual__2025-01-01T00:00:00+00:00/"
                                             "train/-1/run-k1/checkpoints")
    assert [v["name"] for v in first["volumes"]] == [manifest.STORE_VOLUME]  # the store's mount holds it
    # the worker sees it where the bundle prefix of the step lives
    prefix = _identity(1).prefix(store_path("file://" + str(config.worker_store_path)))
    assert manifest.pod_path(config, str(local_path(prefix.parent / "run-k1" / "checkpoints"))) == \
        env[Env.CHECKPOINT_DIR]


def test_every_try_of_one_run_shares_the_directory_and_nothing_else_does():
    config = KubernetesStepOperatorConfig(checkpoint_volume_claim=CLAIM)

    def where(identity: StepIdentity) -> str:
        return _pod(_job(config, identity))[1][Env.CHECKPOINT_DIR]

    assert where(_identity(1)) == where(_identity(2)) == where(_identity(5))
    assert where(_identity(1, run_key="k2")) != where(_identity(1))  # a run re-created under the same run_id
    assert where(_identity(1, map_index=3)) != where(_identity(1))
    assert where(_identity(1, run_key="")).endswith("/train/-1")  # a run key is always given by the operator


def test_a_dedicated_claim_is_mounted_with_its_path_as_sub_path():
    config = KubernetesStepOperatorConfig(checkpoint_volume_claim=CLAIM, checkpoint_volume_path="/teams/ml/")
    pod, env = _pod(_job(config, _identity()))
    assert pod["volumes"] == [{"name": manifest.CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": CLAIM}}]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": manifest.CHECKPOINT_VOLUME, "mountPath": manifest.CHECKPOINT_MOUNT, "subPath": "teams/ml"}]
    assert env[Env.CHECKPOINT_DIR].startswith(manifest.CHECKPOINT_MOUNT + "/train_dag/")


def test_a_dedicated_claim_wins_over_the_store_and_the_stores_claim_is_one_volume():
    other = _pod(_job(KubernetesStepOperatorConfig(**STORE, checkpoint_volume_claim=CLAIM), _identity()))
    assert [v["persistentVolumeClaim"]["claimName"] for v in other[0]["volumes"]] == ["step-data", CLAIM]
    assert other[1][Env.CHECKPOINT_DIR].startswith(manifest.CHECKPOINT_MOUNT + "/")
    same, env = _pod(_job(KubernetesStepOperatorConfig(**STORE, checkpoint_volume_claim="step-data",
                                                       checkpoint_volume_path="ckpt"), _identity()))
    assert [v["name"] for v in same["volumes"]] == [manifest.STORE_VOLUME]
    assert [(m["name"], m["mountPath"], m.get("subPath")) for m in same["containers"][0]["volumeMounts"]] == [
        (manifest.STORE_VOLUME, manifest.STORE_MOUNT, "artifacts"),
        (manifest.STORE_VOLUME, manifest.CHECKPOINT_MOUNT, "ckpt")]
    assert env[Env.CHECKPOINT_DIR].startswith(manifest.CHECKPOINT_MOUNT + "/")


def test_without_a_durable_place_the_step_gets_no_checkpoint_dir():
    pod, env = _pod(_job(KubernetesStepOperatorConfig(), _identity()))
    assert Env.CHECKPOINT_DIR not in env and "volumes" not in pod


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extras", "message"),
    [
        ({"checkpoint_volume_claim": "Bad_Claim"}, r"checkpoint_volume_claim: 'Bad_Claim' is not a valid "
                                                   r"PersistentVolumeClaim name"),
        ({"checkpoint_volume_claim": "-ckpt"}, "checkpoint_volume_claim: '-ckpt' is not a valid"),
        ({"checkpoint_volume_claim": "c" * 254}, "checkpoint_volume_claim: 'c+' is not a valid"),
        ({"checkpoint_volume_claim": CLAIM, "checkpoint_volume_path": "../other"},
         "checkpoint_volume_path: '../other' must be a path inside the claim, without '..'"),
        ({"checkpoint_volume_claim": CLAIM, "checkpoint_volume_path": "a/../../b"}, "without '..'"),
        ({"checkpoint_volume_path": "ckpt"}, "checkpoint_volume_path: only used with checkpoint_volume_claim"),
    ],
)
def test_bad_checkpoint_extras_are_refused_naming_the_field(extras, message):
    with pytest.raises(ValidationError, match=message):
        KubernetesStepOperatorConfig(**extras)
    with pytest.raises(StepOperatorConfigError, match=r"connection 'ckpt' \(stepops_kubernetes\) extra"):
        parse_config("kubernetes", "ckpt", extras)


def test_the_emulator_refuses_a_sub_path_that_climbs_out_of_the_volume(k8s_emulator):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    job = _job(KubernetesStepOperatorConfig(kubernetes_namespace=NS, checkpoint_volume_claim=CLAIM,
                                            checkpoint_volume_path="x"), _identity())
    job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["subPath"] = "../escape"
    with pytest.raises(ApiException) as caught:
        client.BatchV1Api(k8s_emulator.api_client()).create_namespaced_job(NS, job)
    assert caught.value.status == 422 and "volumeMounts[0].subPath" in caught.value.body, caught.value.body
    assert "must not contain '..'" in caught.value.body


# ---- against the emulator: preempted, then resumed -----------------------------------------------------
@pytest.fixture
def checkpointing(k8s_emulator, monkeypatch):
    """``k8s_ckpt_step_operator``: inline transport, checkpoints on the claim ``step-checkpoints``."""
    from kubernetes import client

    if k8s_emulator.get_object("persistentvolumeclaims", NS, CLAIM) is None:
        client.CoreV1Api(k8s_emulator.api_client()).create_namespaced_persistent_volume_claim(NS, {
            "metadata": {"name": CLAIM},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    connection_like(monkeypatch, "k8s_ckpt_step_operator", "k8s_step_operator", checkpoint_volume_claim=CLAIM,
                    checkpoint_volume_path="ckpt")
    return k8s_emulator


def _resume() -> dict:
    import json
    import time

    where = os.environ["STEPOPS_CHECKPOINT_DIR"]
    assert os.path.isdir(where), "the runtime creates the checkpoint directory"
    state = os.path.join(where, "state.json")
    if os.path.exists(state):
        with open(state, encoding="utf-8") as fh:
            return {"restored": json.load(fh)}
    with open(state, "w", encoding="utf-8") as fh:
        json.dump({"pid": os.getpid()}, fh)
    print("checkpointed", flush=True)
    time.sleep(60)
    return {"restored": None}


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.1)


@pytest.mark.parametrize("conn_id", ["k8s_ckpt_step_operator", "k8s_pvc_step_operator"])
def test_the_retry_of_a_preempted_step_finds_its_checkpoint(checkpointing, conn_id):
    k8s = checkpointing
    hook = make_hook(conn_id)
    task_id = f"resume_{conn_id}"
    spot = KubernetesStepOperatorSettings(use_spot=True, require_checkpoint_dir=True)
    first = hook.submit(make_spec(hook, _resume, task_id=task_id, settings=spot, run_key="rk1"))
    identity = StepIdentity("k8s_tests", "run-1", task_id, -1, 1, "rk1")
    if conn_id == "k8s_ckpt_step_operator":  # where the claim is on the emulator's host
        on_host = Path(identity.step_path(str(k8s.pvc_path(NS, CLAIM) / "ckpt")))
    else:  # workers see the store's claim at worker_artifact_path
        on_host = Path(identity.step_path(str(hook.config.worker_store_path))) / "checkpoints"
    _wait_for(on_host / "state.json")
    pod = k8s.list_objects("pods", NS, f"{manifest.STEP_LABEL}={first['step']}")[0]
    k8s.disrupt(NS, pod["metadata"]["name"], "evicted")
    assert run_trigger(hook, first)["status"] == "preempted"

    second = hook.submit(make_spec(hook, _resume, task_id=task_id, try_number=2, settings=spot, run_key="rk1"))
    assert second["job_id"] != first["job_id"]
    assert run_trigger(hook, second)["status"] == "succeeded"
    hook.collect_output(second)
    pid = json.loads((on_host / "state.json").read_text())["pid"]
    assert read_outcome(store_path(second["output_uri"])).value == {"restored": {"pid": pid}}


def test_a_step_that_requires_checkpoints_is_refused_without_a_durable_place(k8s_emulator):
    hook = make_hook()  # inline transport, no claim
    with pytest.raises(StepOperatorConfigError, match=r"require_checkpoint_dir: step operator 'k8s_step_operator' "
                       r"has no durable place for STEPOPS_CHECKPOINT_DIR; set \"checkpoint_volume_claim\""):
        make_spec(hook, _resume, task_id="requires_ckpt",
                  settings=KubernetesStepOperatorSettings(require_checkpoint_dir=True))
    assert k8s_emulator.list_objects("jobs", NS, f"{manifest.LABEL_PREFIX}/task-id=requires_ckpt") == []


def test_a_spot_step_without_a_durable_place_is_warned_about(k8s_emulator, capsys):
    hook = make_hook()
    spec = make_spec(hook, _resume, task_id="spot_no_ckpt", settings=KubernetesStepOperatorSettings(use_spot=True))
    handle = hook.submit(spec)
    hook.cancel(handle)
    logged = capsys.readouterr()
    assert "runs on spot nodes but gets no STEPOPS_CHECKPOINT_DIR" in logged.out + logged.err, logged
