"""``Job``: one command job's request and state, rendered as the job resource (ARM) and as a run (history).

The runner thread moves a job through ``NotStarted`` -> ``Queued`` -> ``Preparing`` -> ``Running`` ->
``Finalizing`` -> ``Completed`` / ``Failed`` (``CancelRequested`` -> ``Canceled`` when cancelled); API
threads read it. Every read and write holds the job's lock.
"""

from __future__ import annotations

import copy
import threading
import uuid
from datetime import datetime, timezone

from airflow_stepops.testing.azureml._config import PRINCIPAL_ID, PRINCIPAL_NAME, PROVIDER, TENANT_ID
from airflow_stepops.testing.azureml._faults import JSON

#: statuses a job never leaves
TERMINAL = frozenset({"Completed", "Failed", "Canceled"})
#: where a v2 command job's user process output lives in the artifact store
STD_LOG = "user_logs/std_log.txt"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


class Job:
    """A command job: ``request`` is the validated PUT properties, the rest is the service's state."""

    def __init__(self, name: str, request: JSON, *, workspace_path: str, location: str, run_number: int,
                 spot: bool, compute_name: str | None) -> None:
        self.name = name
        self.request = request
        self.workspace_path = workspace_path
        self.location = location
        self.run_number = run_number
        self.spot = spot
        self.compute_name = compute_name
        self.run_uuid = str(uuid.uuid4())
        self.lock = threading.RLock()
        self.status = "NotStarted"
        self.created = utcnow()
        self.modified = self.created
        self.started: datetime | None = None
        self.ended: datetime | None = None
        self.error: JSON | None = None
        self.history: list[tuple[str, datetime]] = [("NotStarted", self.created)]
        self.cancel_requested = False
        self.exit_code: int | None = None
        self.log_url: str | None = None  # SAS URL of user_logs/std_log.txt once it exists
        self.cancel_operation = str(uuid.uuid4())

    # ----- state ------------------------------------------------------------------------------------

    def transition(self, status: str, *, error: JSON | None = None) -> bool:
        """Enter ``status`` unless the job already ended (or, for a non-final status, was cancelled); False
        when it had."""
        with self.lock:
            if self.status in TERMINAL:
                return False
            if self.cancel_requested and status not in TERMINAL and status != "CancelRequested":
                return False
            now = utcnow()
            if status == self.status:
                return True
            self.status = status
            self.modified = now
            self.history.append((status, now))
            if status == "Running" and self.started is None:
                self.started = now
            if status in TERMINAL:
                self.ended = now
                if error is not None:
                    self.error = error
            return True

    def request_cancel(self) -> bool:
        """Mark the job cancelled; False when it had already ended."""
        with self.lock:
            if self.status in TERMINAL:
                return False
            self.cancel_requested = True
            if self.status != "CancelRequested":
                self.transition("CancelRequested")
            return True

    def update_mutable(self, new: JSON) -> None:
        """What a re-PUT may change: description and displayName replace, tags and properties merge
        (deleted tags stay: Azure/azure-sdk-for-python#30671), isArchived replaces."""
        with self.lock:
            for key in ("description", "displayName", "isArchived"):
                if key in new and new[key] is not None:
                    self.request[key] = new[key]
            for key in ("tags", "properties"):
                if new.get(key):
                    self.request.setdefault(key, {}).update(new[key])
            self.modified = utcnow()

    # ----- renderings -------------------------------------------------------------------------------

    @property
    def arm_id(self) -> str:
        return f"{self.workspace_path}/jobs/{self.name}"

    def studio_url(self) -> str:
        sub, rg, ws = _parts(self.workspace_path)
        return f"https://ml.azure.com/runs/{self.name}?wsid=/subscriptions/{sub}/resourcegroups/{rg}/workspaces/{ws}"

    def services(self) -> JSON:
        sub, rg, ws = _parts(self.workspace_path)
        tracking = (f"azureml://{self.location}.api.azureml.ms/mlflow/v1.0/subscriptions/{sub}/resourceGroups/{rg}"
                    f"/providers/{PROVIDER}/workspaces/{ws}?")
        return {"Tracking": {"jobServiceType": "Tracking", "endpoint": tracking},
                "Studio": {"jobServiceType": "Studio", "endpoint": self.studio_url()}}

    def arm(self) -> JSON:
        """The job resource as ``GET .../jobs/{name}`` answers it."""
        with self.lock:
            props = copy.deepcopy(self.request)
            props["status"] = self.status
            props["services"] = self.services()
            props.setdefault("parameters", {})
            return {"id": self.arm_id, "name": self.name,
                    "type": f"{PROVIDER}/workspaces/jobs", "properties": props,
                    "systemData": {"createdAt": iso(self.created), "createdBy": PRINCIPAL_NAME,
                                   "createdByType": "User", "lastModifiedAt": iso(self.modified),
                                   "lastModifiedBy": PRINCIPAL_NAME, "lastModifiedByType": "User"}}

    def run(self, *, details: bool) -> JSON:
        """The job as run history's ``runs/{id}`` (``details=False``) or ``runs/{id}/details`` shows it."""
        with self.lock:
            user = {"userObjectId": PRINCIPAL_ID, "userPuId": "1000000000000000", "userIdp": None,
                    "userAltSecId": None, "userIss": f"https://sts.windows.net/{TENANT_ID}/",
                    "userTenantId": TENANT_ID, "userName": PRINCIPAL_NAME, "upn": PRINCIPAL_NAME}
            run: JSON = {
                "runId": self.name, "runUuid": self.run_uuid, "rootRunId": self.name, "runNumber": self.run_number,
                "status": self.status, "target": self.compute_name or "serverless",
                "startTimeUtc": iso(self.started), "endTimeUtc": iso(self.ended),
                "error": ({"error": self.error, "time": iso(self.ended), "componentName": "CommonRuntime"}
                          if self.error else None),
                "warnings": [], "tags": dict(self.request.get("tags") or {}),
                "properties": dict(self.request.get("properties") or {}), "parameters": {},
                "services": {}, "createdBy": user, "userId": PRINCIPAL_ID,
                "inputs": None, "outputs": None, "revision": len(self.history),
                "statusRevision": len(self.history), "lastModifiedUtc": iso(self.modified),
            }
            if details:
                run["createdTimeUtc"] = iso(self.created)
                run["logFiles"] = {STD_LOG: self.log_url} if self.log_url else {}
            else:
                run.update({"createdUtc": iso(self.created), "displayName": self.request.get("displayName"),
                            "description": self.request.get("description"), "name": None,
                            "experimentId": _experiment_id(self.request.get("experimentName", "Default")),
                            "runType": "azureml.CommonRuntime", "runTypeV2": {"orchestrator": "Execution",
                                                                               "traits": ["azureml.CommonRuntime"]},
                            "cancelUri": None, "hidden": False})
            return run


def _parts(workspace_path: str) -> tuple[str, str, str]:
    segments = workspace_path.strip("/").split("/")
    return segments[1], segments[3], segments[7]


def _experiment_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"stepops-experiment:{name}"))

