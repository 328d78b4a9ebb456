"""What the API server does to an object before storing it: naming, defaulting, validation, admission.

Only the rules a step-operator flavor can trip over are checked, with the API server's messages, so a
flavor that passes here is not surprised by a real cluster on the common mistakes.
"""

from __future__ import annotations

import base64
from typing import Any

from airflow_stepops.testing.kubernetes._store import (
    JOBS,
    NAMESPACES,
    PODS,
    PVCS,
    SECRETS,
    SERVICEACCOUNTS,
    Resource,
    Store,
)
from airflow_stepops.testing.kubernetes._util import (
    JSON,
    ApiError,
    bad_request,
    check_dns_label,
    check_dns_subdomain,
    check_labels,
    invalid,
    new_uid,
    parse_quantity,
    random_suffix,
)

FINALIZER_JOB_TRACKING = "batch.kubernetes.io/job-tracking"
#: ValidateAnnotations: the keys and values of one object's annotations, in bytes
#: (https://github.com/kubernetes/apimachinery/blob/master/pkg/api/validation/objectmeta.go)
TOTAL_ANNOTATION_SIZE_LIMIT = 262144


def check_annotations(annotations: dict[str, Any], field: str) -> list[tuple[str, str]]:
    """Keys are validated lowercased as qualified names; the total of keys and values is capped."""
    causes = check_labels({str(key).lower(): "" for key in annotations}, field)  # an empty value is valid
    if sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items()) > TOTAL_ANNOTATION_SIZE_LIMIT:
        causes.append((field, f"Too long: must have at most {TOTAL_ANNOTATION_SIZE_LIMIT} bytes"))
    return causes


def check_env_names(container: JSON, field: str) -> list[tuple[str, str]]:
    """Kubernetes 1.33 validates env names with RelaxedEnvironmentVariableValidation (beta, on by default
    since 1.32; https://www.kubernetes.dev/resources/keps/4369/): printable ASCII other than '='."""
    causes = []
    for index, env in enumerate(container.get("env") or []):
        name = env.get("name") or ""
        if not name:
            causes.append((f"{field}.env[{index}].name", "Required value"))
        elif any(not " " <= char <= "~" or char == "=" for char in name):
            causes.append((f"{field}.env[{index}].name", f"Invalid value: {name!r}: a valid environment variable "
                                                         "name must consist only of printable ASCII characters "
                                                         "other than '='"))
    return causes


def prepare(store: Store, res: Resource, obj: Any, namespace: str | None, *, default_grace: int) -> JSON:
    """Name, default and validate an object sent to create; raise the API server's error if it is bad."""
    if not isinstance(obj, dict):
        raise bad_request("the body of the request was in an unknown format")
    if obj.get("kind") not in (None, res.kind):
        raise bad_request(f"the object provided is unrecognized (must be of type {res.kind}): kind {obj.get('kind')}")
    meta = obj.setdefault("metadata", {}) or {}
    obj["metadata"] = meta
    if res.namespaced:
        if meta.get("namespace") not in (None, "", namespace):
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    if not meta.get("name"):
        if not meta.get("generateName"):
            raise invalid(res.kind, res.group, "", [("metadata.name", "Required value: name or generateName is "
                                                                       "required")])
        meta["name"] = meta["generateName"] + random_suffix()
    name = meta["name"]
    causes = []
    problem = check_dns_label(name) if res in (NAMESPACES, JOBS) else check_dns_subdomain(name)
    if problem:
        causes.append(("metadata.name", f"Invalid value: {name!r}: {problem}"))
    causes += check_labels(meta.get("labels") or {}, "metadata.labels")
    causes += check_annotations(meta.get("annotations") or {}, "metadata.annotations")
    if causes:
        raise invalid(res.kind, res.group, name, causes)
    meta.pop("uid", None)
    if res in (JOBS, PODS):
        obj.pop("status", None)
    if res is JOBS:
        _default_job(obj, default_grace)
    elif res is PODS:
        _admit_pod(store, obj, default_grace)
    elif res is SECRETS:
        _default_secret(obj)
    elif res is NAMESPACES:
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        obj["status"] = {"phase": "Active"}
    elif res is PVCS:
        obj.setdefault("spec", {}).setdefault("volumeName", f"pvc-{new_uid()}")
        obj["status"] = {"phase": "Bound", "accessModes": obj["spec"].get("accessModes", ["ReadWriteOnce"]),
                         "capacity": (obj["spec"].get("resources") or {}).get("requests", {"storage": "1Gi"})}
    return obj


def _default_secret(obj: JSON) -> None:
    obj.setdefault("type", "Opaque")
    data = obj.setdefault("data", {}) or {}
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    obj["data"] = data


def _default_job(job: JSON, default_grace: int) -> None:
    """Job defaulting: generated selector and template labels, backoffLimit 6, completions 1, ..."""
    name, meta = job["metadata"]["name"], job["metadata"]
    spec = job.setdefault("spec", {})
    template = spec.get("template") or {}
    causes = []
    pod_spec = template.get("spec") or {}
    if pod_spec.get("restartPolicy") not in ("Never", "OnFailure"):
        causes.append(("spec.template.spec.restartPolicy", "Required value: valid values: \"OnFailure\", \"Never\""
                       if "restartPolicy" not in pod_spec else
                       f"Unsupported value: {pod_spec['restartPolicy']!r}: supported values: \"OnFailure\", \"Never\""))
    causes += _check_pod_spec(pod_spec, "spec.template.spec")
    causes += check_labels((template.get("metadata") or {}).get("labels") or {}, "spec.template.metadata.labels")
    causes += check_annotations((template.get("metadata") or {}).get("annotations") or {},
                                "spec.template.metadata.annotations")
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "parallelism", "completions"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or value < (1 if key == "activeDeadlineSeconds" else 0)):
            causes.append((f"spec.{key}", f"Invalid value: {value!r}: must be greater than or equal to "
                                          f"{1 if key == 'activeDeadlineSeconds' else 0}"))
    if spec.get("completionMode", "NonIndexed") != "NonIndexed":
        causes.append(("spec.completionMode", "Unsupported value: the emulator supports NonIndexed Jobs only"))
    if causes:
        raise invalid("Job", "batch", name, causes)
    uid = meta["uid"] = new_uid()  # assigned now so the generated selector can name it; the store keeps it
    spec.setdefault("parallelism", 1)
    spec.setdefault("completions", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    spec.setdefault("manualSelector", False)
    if not spec["manualSelector"]:
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    template.setdefault("metadata", {})
    labels = template["metadata"].setdefault("labels", {})
    labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                   "controller-uid": uid, "job-name": name})
    if not meta.get("labels"):
        meta["labels"] = dict(labels)
    pod_spec.setdefault("terminationGracePeriodSeconds", default_grace)
    _default_pod_spec(pod_spec)
    template["spec"] = pod_spec
    spec["template"] = template
    job["status"] = {}


def _check_pod_spec(spec: JSON, field: str) -> list[tuple[str, str]]:
    causes = []
    containers = spec.get("containers") or []
    if not containers:
        causes.append((f"{field}.containers", "Required value"))
    seen: set[str] = set()
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or []):
            where = f"{field}.{kind}[{index}]"
            if not container.get("name"):
                causes.append((f"{where}.name", "Required value"))
            elif container["name"] in seen:
                causes.append((f"{where}.name", f"Duplicate value: {container['name']!r}"))
            else:
                seen.add(container["name"])
                problem = check_dns_label(container["name"])
                if problem:
                    causes.append((f"{where}.name", f"Invalid value: {container['name']!r}: {problem}"))
            if not container.get("image"):
                causes.append((f"{where}.image", "Required value"))
            causes += _check_resources(container.get("resources") or {}, f"{where}.resources")
            causes += check_env_names(container, where)
    names: set[str] = set()
    for index, volume in enumerate(spec.get("volumes") or []):
        if not volume.get("name"):
            causes.append((f"{field}.volumes[{index}].name", "Required value"))
        elif volume["name"] in names:
            causes.append((f"{field}.volumes[{index}].name", f"Duplicate value: {volume['name']!r}"))
        names.add(volume.get("name") or "")
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or []):
            paths: set[str] = set()
            for m_index, mount in enumerate(container.get("volumeMounts") or []):
                where = f"{field}.{kind}[{index}].volumeMounts[{m_index}]"
                if mount.get("name") not in names:
                    causes.append((f"{where}.name", f"Not found: {mount.get('name')!r}"))
                if mount.get("mountPath") in paths:
                    causes.append((f"{where}.mountPath", f"Invalid value: {mount['mountPath']!r}: must be unique"))
                paths.add(mount.get("mountPath") or "")
                causes += _check_sub_path(mount.get("subPath") or "", f"{where}.subPath")
    return causes


def _check_sub_path(path: str, field: str) -> list[tuple[str, str]]:
    """A subPath is a local descending path (validateLocalDescendingPath in
    https://github.com/kubernetes/kubernetes/blob/master/pkg/apis/core/validation/validation.go)."""
    if path.startswith("/"):
        return [(field, f"Invalid value: {path!r}: must be a relative path")]
    if ".." in path.split("/"):
        return [(field, f"Invalid value: {path!r}: must not contain '..'")]
    return []


def _check_resources(resources: JSON, field: str) -> list[tuple[str, str]]:
    causes = []
    amounts: dict[str, dict[str, Any]] = {}
    for part in ("limits", "requests"):
        for name, value in (resources.get(part) or {}).items():
            try:
                amount = parse_quantity(value)
            except ValueError:
                causes.append((f"{field}.{part}[{name}]", f"Invalid value: {value!r}: quantities must match the "
                                                          "regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"))
                continue
            if amount < 0:
                causes.append((f"{field}.{part}[{name}]", f"Invalid value: {value!r}: must be greater than or equal "
                                                          "to 0"))
            amounts.setdefault(part, {})[name] = amount
            if "/" in name and not name.startswith(("kubernetes.io/", "requests.")) and amount != int(amount):
                causes.append((f"{field}.{part}[{name}]", f"Invalid value: {value!r}: must be an integer"))
    for name, request in amounts.get("requests", {}).items():
        limit = amounts.get("limits", {}).get(name)
        if limit is not None and request > limit:
            causes.append((f"{field}.requests", f"Invalid value: {request}: must be less than or equal to "
                                                f"{name} limit of {limit}"))
        if "/" in name and name not in amounts.get("limits", {}):
            causes.append((f"{field}.limits", "Required value: Limit must be set for non overcommitable resources"))
        elif "/" in name and limit != request:
            causes.append((f"{field}.requests[{name}]", "Invalid value: must be equal to " + name + " limit"))
    return causes


def _default_pod_spec(spec: JSON) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    if "serviceAccount" in spec and "serviceAccountName" not in spec:
        spec["serviceAccountName"] = spec["serviceAccount"]
    for kind in ("initContainers", "containers"):
        for container in spec.get(kind) or []:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            image = str(container.get("image", ""))
            latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
            container.setdefault("imagePullPolicy", "Always" if latest and "@" not in image else "IfNotPresent")
            resources = container.setdefault("resources", {})
            limits = resources.get("limits") or {}
            if limits:  # requests default to limits, as the API server does
                resources["requests"] = {**limits, **(resources.get("requests") or {})}


def _qos_class(spec: JSON) -> str:
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all(
        all((r.get("limits") or {}).get(name) is not None
            and (r.get("limits") or {}).get(name) == (r.get("requests") or {}).get(name, (r.get("limits") or {})[name])
            for name in ("cpu", "memory"))
        for r in resources)
    return "Guaranteed" if guaranteed else "Burstable"


def _admit_pod(store: Store, pod: JSON, default_grace: int) -> None:
    """Pod defaulting and the admission checks that reject a pod (a missing service account)."""
    meta, spec = pod["metadata"], pod.setdefault("spec", {})
    causes = _check_pod_spec(spec, "spec")
    restart = spec.get("restartPolicy", "Always")
    if restart not in ("Always", "OnFailure", "Never"):
        causes.append(("spec.restartPolicy", f"Unsupported value: {restart!r}"))
    if causes:
        raise invalid("Pod", "", meta["name"], causes)
    spec.setdefault("terminationGracePeriodSeconds", default_grace)
    _default_pod_spec(spec)
    account = spec.setdefault("serviceAccountName", "default")
    spec.setdefault("serviceAccount", account)
    if store.peek(SERVICEACCOUNTS, meta["namespace"], account) is None:
        raise ApiError(403, "Forbidden", f'pods "{meta["name"]}" is forbidden: error looking up service account '
                                         f'{meta["namespace"]}/{account}: serviceaccount "{account}" not found',
                       {"name": meta["name"], "kind": "pods"})
    spec.setdefault("tolerations", []).extend([
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300},
    ])
    spec.setdefault("priority", 0)
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}
