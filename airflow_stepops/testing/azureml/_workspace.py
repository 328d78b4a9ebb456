"""The emulated workspace's ARM resources besides jobs: the workspace, datastores, computes, environments.

Shapes follow the ``2024-04-01`` REST API (what ``azure-ai-ml`` 1.35 deserializes). The workspace's
``discoveryUrl`` points back at the emulator, whose discovery document names the emulator as every
data-plane service, so run history (``jobs.stream``) lands on 127.0.0.1 too.
"""

from __future__ import annotations

import copy
import threading
import uuid
from typing import Any

from airflow_stepops.testing.azureml._azurite import ACCOUNT_KEY, ACCOUNT_NAME
from airflow_stepops.testing.azureml._config import PRINCIPAL_NAME, PROVIDER, TENANT_ID, ComputeSpec, EmulatorConfig
from airflow_stepops.testing.azureml._faults import JSON
from airflow_stepops.testing.azureml._jobs import iso, utcnow

_CREATED = utcnow()


def _system_data() -> JSON:
    return {"createdAt": iso(_CREATED), "createdBy": PRINCIPAL_NAME, "createdByType": "User",
            "lastModifiedAt": iso(_CREATED), "lastModifiedBy": PRINCIPAL_NAME, "lastModifiedByType": "User"}


class Workspace:
    """Datastores, computes and environment versions of the one workspace, and their ARM renderings."""

    def __init__(self, config: EmulatorConfig, base_url: str, datastores: dict[str, str]) -> None:
        self.config = config
        self.base_url = base_url
        self.path = config.workspace_path
        self.workspace_id = str(uuid.uuid5(uuid.NAMESPACE_URL, self.path.lower()))
        self.datastores = datastores  # name -> container; shared with Storage
        self.computes: dict[str, ComputeSpec] = dict(config.computes)
        self.environments: dict[tuple[str, str], JSON] = {}
        self.lock = threading.Lock()

    # ----- the workspace ----------------------------------------------------------------------------

    def discovery(self) -> JSON:
        """The document at ``discoveryUrl``: every service of the workspace is the emulator."""
        services = ("api", "catalog", "experimentation", "gallery", "history", "hyperdrive", "labeling",
                    "modelmanagement", "pipelines", "studiocoreservices")
        return {name: self.base_url for name in services}

    def arm(self) -> JSON:
        cfg = self.config
        storage = (f"/subscriptions/{cfg.subscription_id}/resourceGroups/{cfg.resource_group}/providers/"
                   f"Microsoft.Storage/storageAccounts/{ACCOUNT_NAME}")
        return {
            "id": self.path, "name": cfg.workspace_name, "type": f"{PROVIDER}/workspaces", "location": cfg.location,
            "kind": "Default", "tags": {}, "sku": {"name": "Basic", "tier": "Basic"},
            "identity": {"type": "SystemAssigned", "principalId": str(uuid.uuid5(uuid.NAMESPACE_URL, self.path)),
                         "tenantId": TENANT_ID},
            "systemData": _system_data(),
            "properties": {
                "friendlyName": cfg.workspace_name, "description": "Azure ML emulator (airflow-stepops)",
                "workspaceId": self.workspace_id, "provisioningState": "Succeeded",
                "storageAccount": storage, "discoveryUrl": f"{self.base_url}/discovery/workspaces/{self.workspace_id}",
                "mlFlowTrackingUri": (f"azureml://{cfg.location}.api.azureml.ms/mlflow/v1.0/subscriptions/"
                                      f"{cfg.subscription_id}/resourceGroups/{cfg.resource_group}/providers/"
                                      f"{PROVIDER}/workspaces/{cfg.workspace_name}"),
                "publicNetworkAccess": "Enabled", "hbiWorkspace": False, "v1LegacyMode": False,
                "enableDataIsolation": False, "systemDatastoresAuthMode": "accesskey",
                "creationTime": iso(_CREATED), "tenantId": TENANT_ID, "storageHnsEnabled": False,
                "notebookInfo": None, "privateEndpointConnections": [], "sharedPrivateLinkResources": [],
            },
        }

    # ----- datastores ---------------------------------------------------------------------------------

    def datastore(self, name: str) -> JSON | None:
        container = self.datastores.get(name)
        if container is None:
            return None
        return {
            "id": f"{self.path}/datastores/{name}", "name": name, "type": f"{PROVIDER}/workspaces/datastores",
            "systemData": _system_data(),
            "properties": {
                "datastoreType": "AzureBlob", "accountName": ACCOUNT_NAME, "containerName": container,
                "endpoint": "core.windows.net", "protocol": "https", "isDefault": name == "workspaceblobstore",
                "serviceDataAccessAuthIdentity": "WorkspaceSystemAssignedIdentity",
                "credentials": {"credentialsType": "AccountKey"}, "description": None, "properties": {}, "tags": {},
                "subscriptionId": self.config.subscription_id, "resourceGroup": self.config.resource_group,
            },
        }

    def datastore_secrets(self, name: str) -> JSON | None:
        if name not in self.datastores:
            return None
        return {"secretsType": "AccountKey", "key": ACCOUNT_KEY}

    # ----- computes -----------------------------------------------------------------------------------

    def compute_name(self, compute_id: str) -> str:
        return compute_id.rstrip("/").rsplit("/", 1)[-1]

    def compute_exists(self, compute_id: str) -> bool:
        with self.lock:
            return self.compute_name(compute_id) in self.computes

    def compute_spec(self, name: str) -> ComputeSpec | None:
        with self.lock:
            return self.computes.get(name)

    def compute(self, name: str) -> JSON | None:
        spec = self.compute_spec(name)
        if spec is None:
            return None
        return {
            "id": f"{self.path}/computes/{name}", "name": name, "type": f"{PROVIDER}/workspaces/computes",
            "location": self.config.location, "tags": {}, "systemData": _system_data(),
            "identity": None, "sku": None,
            "properties": {
                "computeType": "AmlCompute", "computeLocation": self.config.location, "provisioningState": "Succeeded",
                "description": None, "createdOn": iso(_CREATED), "modifiedOn": iso(_CREATED),
                "isAttachedCompute": False, "disableLocalAuth": True, "provisioningErrors": None,
                "properties": {
                    "vmSize": spec.vm_size, "vmPriority": "LowPriority" if spec.low_priority else "Dedicated",
                    "osType": "Linux", "remoteLoginPortPublicAccess": "Disabled", "enableNodePublicIp": True,
                    "isolatedNetwork": False, "allocationState": "Steady", "currentNodeCount": 0,
                    "targetNodeCount": 0, "nodeStateCounts": {"idleNodeCount": 0, "runningNodeCount": 0,
                                                              "preparingNodeCount": 0, "unusableNodeCount": 0,
                                                              "leavingNodeCount": 0, "preemptedNodeCount": 0},
                    "scaleSettings": {"maxNodeCount": spec.max_nodes, "minNodeCount": 0,
                                      "nodeIdleTimeBeforeScaleDown": "PT2M"},
                    "allocationStateTransitionTime": iso(_CREATED), "errors": None,
                },
            },
        }

    # ----- environments -----------------------------------------------------------------------------

    def put_environment(self, name: str, version: str, body: Any) -> tuple[JSON, bool]:
        """Store an environment version (an existing one is returned unchanged); (resource, created)."""
        props = copy.deepcopy((body or {}).get("properties") or {}) if isinstance(body, dict) else {}
        with self.lock:
            existing = self.environments.get((name, version))
            if existing is not None:
                return copy.deepcopy(existing), False
            props.setdefault("isAnonymous", False)
            props.setdefault("isArchived", False)
            props.setdefault("osType", "Linux")
            props.setdefault("environmentType", "UserCreated")
            props["provisioningState"] = "Succeeded"
            resource = {"id": f"{self.path}/environments/{name}/versions/{version}", "name": version,
                        "type": f"{PROVIDER}/workspaces/environments/versions", "systemData": _system_data(),
                        "properties": props}
            self.environments[(name, version)] = resource
            return copy.deepcopy(resource), True

    def environment(self, name: str, version: str) -> JSON | None:
        with self.lock:
            found = self.environments.get((name, version))
            return copy.deepcopy(found) if found else None

    def environment_versions(self, name: str) -> list[JSON]:
        with self.lock:
            return [copy.deepcopy(v) for (n, _), v in self.environments.items() if n == name]

    def environment_image(self, environment_id: str) -> str | None:
        """The Docker image of the environment an ARM id names (None for one built otherwise)."""
        segments = environment_id.strip("/").split("/")
        found = self.environment(segments[9], segments[11]) if len(segments) >= 12 else None
        return ((found or {}).get("properties") or {}).get("image")

    def environment_exists(self, environment_id: str) -> bool:
        segments = environment_id.strip("/").split("/")
        if len(segments) < 12 or segments[8].lower() != "environments" or segments[10].lower() != "versions":
            return False
        if "/".join(segments[:8]).lower() != self.path.strip("/").lower():
            return False
        with self.lock:
            return (segments[9], segments[11]) in self.environments
