"""SageMaker warm pools, as far as a job sees them: the persistent cache directory.

"The location of the persistent cache is /opt/ml/sagemaker/warmpoolcache. The environment variable
SAGEMAKER_MANAGED_WARMPOOL_CACHE_DIRECTORY points to the location." A job with ``KeepAlivePeriodInSeconds`` > 0
keeps its instance, and the cache, for that long after it ends; the next job reuses it only when RoleArn,
InstanceCount, InstanceType, VolumeKmsKeyId, VolumeSizeInGB, VpcConfig, EnableInterContainerTrafficEncryption and
EnableNetworkIsolation all match, and the cache goes with the pool
(https://docs.aws.amazon.com/sagemaker/latest/dg/train-warm-pools.html).
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

CACHE = "/opt/ml/sagemaker/warmpoolcache"
ENV = "SAGEMAKER_MANAGED_WARMPOOL_CACHE_DIRECTORY"


def _matching(request: dict[str, Any]) -> str:
    resources = request.get("ResourceConfig") or {}
    return json.dumps([request.get("RoleArn"), *(resources.get(k) for k in (
        "InstanceCount", "InstanceType", "VolumeKmsKeyId", "VolumeSizeInGB")), request.get("VpcConfig"),
        bool(request.get("EnableInterContainerTrafficEncryption")), bool(request.get("EnableNetworkIsolation"))],
        sort_keys=True)


class WarmPools:
    """The pools kept after their jobs ended, each with its cache directory, until their keep-alive runs out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._idle: list[tuple[str, float, Path]] = []  # (matching key, expiry, cache directory)
        self._numbers = itertools.count(1)

    def acquire(self, request: dict[str, Any]) -> Path | None:
        """The cache of a matching idle pool, else of a new one; None for a job without a warm pool."""
        if not (request.get("ResourceConfig") or {}).get("KeepAlivePeriodInSeconds"):
            return None
        key, now = _matching(request), time.monotonic()
        with self._lock:
            for expired in [p for p in self._idle if p[1] <= now]:
                self._idle.remove(expired)
                shutil.rmtree(expired[2], ignore_errors=True)
            for pool in self._idle:
                if pool[0] == key:
                    self._idle.remove(pool)
                    return pool[2]
            path = self.root / f"pool-{next(self._numbers)}"
        path.mkdir(parents=True)
        return path

    def release(self, request: dict[str, Any], path: Path | None) -> None:
        """The job ended: its pool waits ``KeepAlivePeriodInSeconds`` for the next matching job."""
        if path is not None:
            keep = float((request.get("ResourceConfig") or {}).get("KeepAlivePeriodInSeconds") or 0)
            with self._lock:
                self._idle.append((_matching(request), time.monotonic() + keep, path))
