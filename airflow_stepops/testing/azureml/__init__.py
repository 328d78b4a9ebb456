"""A local Azure Machine Learning workspace whose command jobs run as local processes.

Two servers on 127.0.0.1: Azurite (Microsoft's storage emulator, blob service only, from the
repository's ``package.json`` — run ``npm ci`` first) and an HTTPS aiohttp server (own thread and event
loop) answering the ARM, run-history and discovery calls ``azure.ai.ml.MLClient`` makes::

    from azure.ai.ml import Input, Output, command
    from azure.ai.ml.entities import Environment
    from airflow_stepops.testing.azureml import AzureMLEmulator

    with AzureMLEmulator(stop_grace_period=1) as aml:
        ml_client = aml.ml_client()                    # or env() for another process
        job = command(command="python train.py --data ${{inputs.data}} --out ${{outputs.model}}",
                      environment=Environment(image="python:3.11"), compute="cpu-cluster",
                      inputs={"data": Input(path="azureml://datastores/workspaceblobstore/paths/in/")},
                      outputs={"model": Output(type="uri_folder")}, name="train-1")
        ml_client.jobs.create_or_update(job)
        ml_client.jobs.stream("train-1")               # prints user_logs/std_log.txt live

Base URL: azure-ai-ml builds every ARM client on ``_get_base_url_from_metadata(is_local_mfe=True)``,
which returns ``$AZUREML_DEV_URL_MFE`` when set (read once, in ``MLClient.__init__``); no ``cloud=`` or
cloud metadata is needed. Run history is found through the workspace's ``discoveryUrl``, which the
emulator points at itself, so ``jobs.stream`` lands on 127.0.0.1 too. The URL must be HTTPS: azure-core's
bearer-token policy refuses plain HTTP unless a call passes ``enforce_https=False``, which
``workspaces.get`` (used by ``jobs.stream``) never does. The emulator therefore makes a throwaway CA and
certificate; clients trust it through ``connection_verify`` (``ml_client()`` does this) or
``REQUESTS_CA_BUNDLE``/``SSL_CERT_FILE`` (in ``env()``, a bundle of certifi's roots plus the CA).
``env()`` also names an App Service style managed-identity endpoint (``IDENTITY_ENDPOINT``/
``IDENTITY_HEADER``), so ``DefaultAzureCredential()`` gets tokens offline; any bearer token is accepted.

Jobs (``Command`` only; see ``_validate`` for the checks, ARM error format, 400): ``NotStarted`` ->
``Queued`` (``queue_seconds``) -> ``Preparing`` (inputs downloaded from Azurite, ``prepare_seconds``) ->
``Running`` (``bash -c <command>`` as its own process group, ``${{inputs.x}}``/``${{outputs.x}}``
replaced by ``<workdir>/jobs/<name>/inputs|outputs/<x>``, a minimal environment plus the job's
``environmentVariables``, ``python`` = this interpreter) -> ``Finalizing`` (outputs uploaded to their
``uri``, default ``azureml://datastores/workspaceblobstore/paths/azureml/<job>/<output>/``, also after
a failure) -> ``Completed``/``Failed``; ``begin_cancel`` -> ``CancelRequested`` -> ``Canceled`` (SIGTERM,
SIGKILL after ``stop_grace_period``). A non-zero exit fails with ``UserError`` "Execution failed. User
process '<program>' exited with status code N. Please check log file 'user_logs/std_log.txt' for error
details. Error: ..."; ``limits.timeout`` cancels the job (``CancelRequested`` -> ``Canceled``, as the REST
reference says of it). The
output goes to ``user_logs/std_log.txt`` (container ``azureml``, ``ExperimentRun/dcid.<job>/``), listed
with a SAS URL in run history's ``logFiles``. A second PUT of a name answers the job (200) when only
description, tags, displayName, properties or isArchived differ, else the service's "A job with this
name already exists" ``UserError`` (400). Datastores ``workspaceblobstore`` (container
``azureml-blobstore-<workspace id>``) and ``workspaceartifactstore`` (``azureml``); computes
``cpu-cluster``, ``gpu-cluster``, ``lowpri-cluster`` (low priority) and ``add_compute()``; serverless
jobs need ``resources.instanceType``.

Faults: ``aml.inject("preemption", job="train-1", after=2)`` (a Spot-tier or low-priority job fails with
AmlCompute's ``PreemptionError``, also its ``innerError`` code; others with a ``NodeFailure``),
``"quota_exceeded"`` (the create answers ``JobNodeCountExceedsCoreQuota``), ``"failure"`` (``message``),
``"slow_start"`` (``duration``); ``aml.fail_requests(503, "ServiceUnavailable", path_contains="/jobs/")`` fails
API calls, ``aml.lose_replies("drop"|"hang", method="PUT", path_contains="/jobs/")`` carries a call out but
loses its reply. Inspection:
``jobs``, ``job``, ``wait_for_status``, ``pids``, ``job_dir``, ``logs``, ``requests``.

Not emulated: other job types (pipeline, sweep, AutoML, Spark), code assets (``codeId``: the SDK uploads
code straight to ``<account>.blob.core.windows.net``), images (only the command runs), more than one
node or distribution, the ``default`` output the service adds (with it, ``jobs.stream`` would list logs
straight from ``<account>.blob.core.windows.net``), ``jobs.download``, job deletion, MLflow tracking,
metrics, data and model assets, mounts (inputs are always downloaded), identities and RBAC.
"""

from airflow_stepops.testing.azureml._auth import StaticTokenCredential
from airflow_stepops.testing.azureml._azurite import ACCOUNT_KEY, ACCOUNT_NAME, AzuriteNotFoundError
from airflow_stepops.testing.azureml._config import ComputeSpec, EmulatorConfig
from airflow_stepops.testing.azureml._emulator import MFE_URL_ENV, AzureMLEmulator
from airflow_stepops.testing.azureml._faults import (
    NODE_LOST_ERROR,
    PREEMPTION_ERROR,
    ApiError,
    Fault,
    FaultRule,
    RequestFault,
)

__all__ = ["ACCOUNT_KEY", "ACCOUNT_NAME", "MFE_URL_ENV", "NODE_LOST_ERROR", "PREEMPTION_ERROR", "ApiError",
           "AzureMLEmulator", "AzuriteNotFoundError", "ComputeSpec", "EmulatorConfig", "Fault", "FaultRule",
           "RequestFault", "StaticTokenCredential"]
