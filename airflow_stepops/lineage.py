"""OpenLineage facets of a step task: the artifacts and channels it read, the result it wrote, and the remote job
that ran it. Read by the OpenLineage provider when it is installed (``pip install airflow-stepops[openlineage]``);
nothing here is imported otherwise.

Dataset names follow OpenLineage's naming (https://openlineage.io/docs/spec/naming): ``s3://bucket`` / key,
``gs://bucket`` / object, ``file`` / absolute path, and ``<scheme>://<container>`` / path for the other stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: the run facet naming the backend that ran the step (the provider's own ``processing_engine`` names Airflow)
ENGINE_FACET = "stepops_processing_engine"


def dataset(uri: str) -> Any:
    from airflow.providers.common.compat.openlineage.facet import Dataset

    scheme, _, rest = uri.partition("://")
    if not rest:
        return Dataset(namespace="file", name=uri)
    if scheme == "file":
        return Dataset(namespace="file", name="/" + rest.lstrip("/"))
    bucket, _, key = rest.partition("/")
    return Dataset(namespace=f"{scheme}://{bucket}", name=key or "/")


def operator_lineage(handle: Any, *, outputs: Sequence[str] = (), inputs: Sequence[str] = ()) -> Any:
    """``OperatorLineage`` of a step: ``inputs``/``outputs`` (URIs), and, once it has a job, that job as an external
    query of its flavor and the backend as its processing engine."""
    from airflow.providers.common.compat.openlineage.facet import ExternalQueryRunFacet
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.generated.processing_engine_run import ProcessingEngineRunFacet

    from airflow_stepops import __version__

    run_facets: dict[str, Any] = {}
    if handle and handle.get("job_id"):
        flavor = str(handle.get("flavor") or "")
        run_facets["externalQuery"] = ExternalQueryRunFacet(externalQueryId=str(handle["job_id"]),
                                                            source=f"stepops_{flavor}")
        run_facets[ENGINE_FACET] = ProcessingEngineRunFacet(version=__version__, name=f"airflow-stepops/{flavor}")
    return OperatorLineage(inputs=[dataset(u) for u in dict.fromkeys([*(handle or {}).get("inputs", []), *inputs])],
                           outputs=[dataset(u) for u in dict.fromkeys(outputs)], run_facets=run_facets)
