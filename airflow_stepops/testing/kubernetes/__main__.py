"""Run the Kubernetes emulator as a process: ``python -m airflow_stepops.testing.kubernetes``.

Writes a kubeconfig for it, then serves until SIGINT/SIGTERM. Point a ``stepops_kubernetes`` step
operator at that kubeconfig (``config_file`` and ``kubernetes_context``) to run DAGs offline::

    python -m airflow_stepops.testing.kubernetes --kubeconfig /tmp/emulator.kubeconfig --namespace ml
"""

from __future__ import annotations

from pathlib import Path

from airflow_stepops.testing import _cli
from airflow_stepops.testing.kubernetes import KubernetesEmulator, NodeSpec

#: the emulated node looks like a spot node with 4 A100s, so GPU and spot examples schedule
DEFAULT_NODE_LABELS = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB", "karpenter.sh/capacity-type": "spot"}


def main(argv: list[str] | None = None) -> int:
    parser = _cli.parser("kubernetes", __doc__)
    parser.add_argument("--kubeconfig", required=True, type=Path, help="where to write the kubeconfig")
    parser.add_argument("--context", default="stepops-emulator", help="context name in the kubeconfig")
    parser.add_argument("--namespace", action="append", default=[], help="namespace to create (repeatable)")
    parser.add_argument("--grace-period-cap", type=float, default=5.0,
                        help="longest SIGTERM-to-SIGKILL wait when pods are deleted (seconds)")
    parser.add_argument("--node-label", action="append", default=[], metavar="KEY=VALUE",
                        help="extra label of the emulated node (repeatable)")
    ns = parser.parse_args(argv)
    labels = dict(DEFAULT_NODE_LABELS)
    for item in ns.node_label:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--node-label {item!r}: expected KEY=VALUE")
        labels[key] = value
    namespaces = tuple(dict.fromkeys(["default", *ns.namespace]))

    def ready(k8s: KubernetesEmulator) -> str:
        tmp = ns.kubeconfig.with_name(ns.kubeconfig.name + ".tmp")
        k8s.write_kubeconfig(tmp, context=ns.context, namespace=namespaces[-1])
        tmp.replace(ns.kubeconfig)  # appears complete: callers wait for the file
        return f"Kubernetes emulator serving on {k8s.url}; kubeconfig {ns.kubeconfig} (context {ns.context})"

    return _cli.serve(KubernetesEmulator(port=ns.port, namespaces=namespaces, grace_period_cap=ns.grace_period_cap,
                                         node=NodeSpec(labels=labels)), ready, written=ns.kubeconfig)


if __name__ == "__main__":
    raise SystemExit(main())
