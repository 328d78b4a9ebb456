"""A local Kubernetes API emulator whose Jobs run their pod's command as local subprocesses.

The real ``kubernetes`` and ``kubernetes_asyncio`` clients talk to it unchanged::

    from kubernetes import client
    from airflow_stepops.testing.kubernetes import Fault, KubernetesEmulator

    with KubernetesEmulator(grace_period_cap=2) as k8s:          # 127.0.0.1, a free port, own thread
        batch = client.BatchV1Api(k8s.api_client())               # or k8s.async_api_client() in a loop,
        batch.create_namespaced_job("default", job_manifest)       # or k8s.write_kubeconfig(context=...)
        k8s.wait_for_job("default", "my-job")

Faults: ``k8s.inject(Fault("image_pull"), job="my-job")`` for the next matching pod, the pod annotation
``stepops.emulator/fault`` (``"evicted"`` or ``{"kind": "evicted", "after": 1}``), ``k8s.disrupt(ns, pod,
"preempted")`` on a running pod, and ``k8s.fail_requests(503, method="POST", after_commit=True)`` for the
API itself. ``k8s.requests()`` lists the calls served; ``k8s.pids(job)`` the running processes.

Served: ``/version``, ``/api``, ``/apis`` discovery; namespaces, nodes (one, see ``NodeSpec``), pods
(+ ``/log``, ``/status``), configmaps, secrets, events, serviceaccounts, persistentvolumeclaims and
``batch/v1`` jobs (+ ``/status``) with get, list (label and field selectors, ``limit``/``continue``),
watch (resume from a resourceVersion, bookmarks), create, replace, patch (merge, JSON, strategic
merge approximated by merging named lists by name), delete (Foreground / Background / Orphan — the
``batch/v1`` default — through finalizers and a garbage collector) and deletecollection.

Behaviour: a scheduler (requests vs node capacity, nodeSelector, required node affinity, taints, missing
PVCs), a kubelet (init containers, the first container as a process group, restart policies with
CrashLoopBackOff, SIGTERM then SIGKILL after the grace period, env with ``valueFrom`` and ``envFrom``,
emptyDir/hostPath/PVC/configMap/secret volumes mapped to host directories and rewritten in command, args
and env, the termination message, pod ``activeDeadlineSeconds``), the Job controller of Kubernetes 1.31+
(job-tracking finalizers, backoffLimit, podFailurePolicy, activeDeadlineSeconds, suspend,
ttlSecondsAfterFinished, SuccessCriteriaMet/FailureTarget before Complete/Failed) and Events.

Not emulated: images (only commands run; ``python3`` means the host's interpreter;
like a python3-only image, there is no ``python``), other containers than
the first (reported running alongside it), Indexed Jobs, probes, services and networking, RBAC
(an optional bearer token only), server-side apply semantics, protobuf, and field managers.
"""

from airflow_stepops.testing.kubernetes._config import EmulatorConfig, NodeSpec
from airflow_stepops.testing.kubernetes._emulator import KubernetesEmulator
from airflow_stepops.testing.kubernetes._faults import FAULT_ANNOTATION, Fault, FaultRule
from airflow_stepops.testing.kubernetes._server import ApiFault

__all__ = ["FAULT_ANNOTATION", "ApiFault", "EmulatorConfig", "Fault", "FaultRule", "KubernetesEmulator", "NodeSpec"]
