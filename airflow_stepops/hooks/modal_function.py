"""The Modal function a step calls: its options, the app it is deployed in, and deploying it once.

Every distinct set of options (image, GPU list, CPU, memory, timeout, region, cloud, secrets, volumes and
the checkpoint volume)
is one deployed app ``<app_name>-<digest>`` holding one function, ``run_step``. Options are fixed when
a function is deployed (a GPU fallback list can only be given there), and deploying an app replaces
its set of functions, so steps with different options must not share an app. Workers deploying the same
options at once race for the app; the losers use the function the winner deployed.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from airflow_stepops.hooks import modal_call
from airflow_stepops.settings.modal import (
    CHECKPOINT_MOUNT,
    MAX_TIMEOUT,
    ModalStepOperatorConfig,
    ModalStepOperatorSettings,
)

FUNCTION_NAME = "run_step"
_deployed: dict[tuple[str, ...], Any] = {}
_deploy_lock = threading.Lock()


def runner_source() -> str:
    from airflow_stepops.runtime import entry, protocol

    return inspect.getsource(entry) + inspect.getsource(protocol)


#: a step without its own timeout gets its Airflow execution_timeout (plus a minute) rounded up to one of
#: these, so that a lost call stops billing soon after Airflow gave up on it while steps still share apps
TIMEOUT_STEPS = (600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 12 * 3600, MAX_TIMEOUT)


def default_timeout(execution_timeout: float | None) -> int:
    if not execution_timeout:
        return MAX_TIMEOUT
    wanted = math.ceil(execution_timeout) + 60
    return next((step for step in TIMEOUT_STEPS if step >= wanted), MAX_TIMEOUT)


def _names_cloudpickle(requirement: str) -> bool:
    import re

    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-") == "cloudpickle"


def function_options(config: ModalStepOperatorConfig, settings: ModalStepOperatorSettings,
                     resources: Any, python_version: str, execution_timeout: float | None = None,
                     on_demand: bool = False) -> dict[str, Any]:
    """The deployed function's options as JSON: what ``stepops render`` prints and what names the app.

    ``on_demand``: an attempt escalated to on-demand capacity runs ``nonpreemptible`` (Modal does not preempt such
    containers: https://modal.com/docs/guide/preemption); the options name the app, so it is another app.

    The default image gets the worker's Python (the bundle's pickles need the same major.minor) and the
    worker's cloudpickle version; a registry image brings its own Python (``python_version`` adds one).
    """
    import cloudpickle

    shape = settings.function_resources(resources)
    image: dict[str, Any] = ({"registry": config.image, "add_python": config.python_version} if config.image
                             else {"debian_slim": config.python_version or python_version})
    packages = list(config.pip_packages)
    if not config.image and not any(_names_cloudpickle(p) for p in packages):
        packages.append(f"cloudpickle=={cloudpickle.__version__}")  # the step's bundle is a cloudpickle
    image["pip_install"] = packages
    image["worker_python"] = python_version  # part of the app's identity: a worker upgrade redeploys
    options: dict[str, Any] = {
        "image": image,
        "gpu": shape["gpu"], "cpu": shape["cpu"], "memory": shape["memory"],
        "ephemeral_disk": shape["ephemeral_disk"],
        "timeout": settings.effective_timeout or default_timeout(execution_timeout),
        "region": settings.region if settings.region is not None else config.region,
        "cloud": settings.cloud or config.cloud,
        "secrets": sorted(config.secrets),
        "volumes": dict(sorted(config.volumes.items())),
        # every step's Env.CHECKPOINT_DIR lives on this volume (created if missing, unlike "volumes")
        "checkpoint_volume": {CHECKPOINT_MOUNT: config.checkpoint_volume_name},
        "nonpreemptible": settings.nonpreemptible or on_demand or None,
        "retries": 0,  # a retry is Airflow's decision (a new try, with its own call)
        "single_use_containers": True,  # no warm GPU left billing, no state left for the next step
    }
    return {key: value for key, value in options.items() if value not in (None, [], {})}


def app_name(config: ModalStepOperatorConfig, options: dict[str, Any]) -> str:
    """``<app_name>-<12 hex>``: the options and the runner's source decide it."""
    digest = hashlib.sha256(json.dumps([options, runner_source()], sort_keys=True).encode()).hexdigest()
    return f"{config.app_name}-{digest[:12]}"


def _image(modal: Any, spec: dict[str, Any]) -> Any:
    if "registry" in spec:
        image = modal.Image.from_registry(spec["registry"], add_python=spec.get("add_python"))
    else:
        image = modal.Image.debian_slim(python_version=spec["debian_slim"])
    if spec.get("pip_install"):
        image = image.pip_install(*spec["pip_install"])
    return image


def deployed_function(client: Any, environment: str | None, name: str, options: dict[str, Any],
                      log: Any) -> Any:
    """The hydrated ``run_step`` of app ``name``: looked up, or deployed when Modal has no such app."""
    import modal

    key = (str(id(client)), environment or "", name)
    with _deploy_lock:
        if key in _deployed:
            return _deployed[key]
        function = _lookup(modal, client, environment, name)
        if function is None:
            try:
                function = _deploy(modal, client, environment, name, options, log)
            except Exception:
                # Workers starting steps with the same options at once deploy the same app: Modal serialises changes
                # to an app and fails the others ("The selected app is locked - probably due to a concurrent
                # modification"; the lock is transient: https://github.com/imbue-ai/mngr/pull/1858). The app is
                # named by the options, so the winner's function is this step's too: wait for it to appear.
                function = _deployed_meanwhile(modal, client, environment, name, log)
                if function is None:
                    raise
        _deployed[key] = function
        return function


def _lookup(modal: Any, client: Any, environment: str | None, name: str) -> Any | None:
    from modal.exception import NotFoundError

    function = modal.Function.from_name(name, FUNCTION_NAME, environment_name=environment, client=client)
    try:
        modal_call.hydrate(function)
    except NotFoundError:
        return None
    return function


def _deployed_meanwhile(modal: Any, client: Any, environment: str | None, name: str, log: Any) -> Any | None:
    """The function a concurrent deploy of app ``name`` made, looked up for up to about 15 s."""
    for delay in (0.5, 1.0, 2.0, 4.0, 8.0):
        time.sleep(delay)
        function = _lookup(modal, client, environment, name)
        if function is not None:
            log.info("Modal app %s was deployed by another worker at the same time: using its function", name)
            return function
    return None


@contextlib.contextmanager
def runner_by_value() -> Iterator[Any]:
    """While deploying, ``entry.run_step`` is pickled by value (with ``protocol``, which it uses) by Modal's own
    (vendored) cloudpickle, so images need no airflow_stepops; registering with the PyPI cloudpickle would not
    reach Modal's copy."""
    from modal._vendor import cloudpickle as modal_cloudpickle

    from airflow_stepops.runtime import entry, protocol

    for module in (entry, protocol):
        modal_cloudpickle.register_pickle_by_value(module)
    try:
        yield entry.run_step
    finally:
        for module in (entry, protocol):
            modal_cloudpickle.unregister_pickle_by_value(module)


def _deploy(modal: Any, client: Any, environment: str | None, name: str, options: dict[str, Any], log: Any) -> Any:
    log.info("Deploying Modal app %s (function %s: %s)", name, FUNCTION_NAME,
             json.dumps({k: v for k, v in options.items() if k != "image"}, sort_keys=True))
    app = modal.App(name)
    secrets = [modal.Secret.from_name(s, environment_name=environment) for s in options.get("secrets", [])]
    volumes = {path: modal.Volume.from_name(volume, environment_name=environment)  # a typo must not make one
               for path, volume in options.get("volumes", {}).items()}
    # The checkpoint volume is ours to create. Modal mounts a volume's latest committed state when a container
    # starts and commits the container's changes in the background and when the container exits, also after
    # a preemption's interrupt (https://modal.com/docs/guide/volumes, "Volume commits and reloads";
    # https://modal.com/docs/guide/preemption; the modal client marks every mount allow_background_commits
    # and its container runtime commits them after the function's exit handlers).
    volumes.update({path: modal.Volume.from_name(volume, environment_name=environment, create_if_missing=True)
                    for path, volume in options.get("checkpoint_volume", {}).items()})
    with runner_by_value() as run_step:
        function = app.function(
            serialized=True, name=FUNCTION_NAME, image=_image(modal, options["image"]), gpu=options.get("gpu"),
            cpu=options.get("cpu"), memory=options.get("memory"), ephemeral_disk=options.get("ephemeral_disk"),
            timeout=options["timeout"], region=options.get("region"), cloud=options.get("cloud"),
            nonpreemptible=bool(options.get("nonpreemptible")), secrets=secrets, volumes=volumes, retries=0,
            single_use_containers=bool(options.get("single_use_containers")), include_source=False)(run_step)
        app.deploy(name=name, environment_name=environment, client=client)
    return function
