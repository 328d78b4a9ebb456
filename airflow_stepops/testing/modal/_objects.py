"""The objects a deploy makes, kept as the server would: environments, apps, images, secrets, volumes,
mounts and function definitions.

A function's definition is what ``FunctionCreate`` carried: one ``api_pb2.Function``, or, for a GPU
fallback list (``gpu=["H100", "A100-80GB"]``), ``FunctionData.ranked_functions`` — one copy of the function
per GPU type, ranked in the order given, differing only in ``resources.gpu_config``. A deploy of an app
that exists again reuses the app and function ids (the client passes ``existing_function_id``); the new
definition takes effect when ``AppPublish`` makes a new app version. Calls keep the definition they were
made with.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib import GRPCError, Status
from modal._utils.blob_utils import MAX_ASYNC_OBJECT_SIZE_BYTES, MAX_OBJECT_SIZE_BYTES
from modal_proto import api_pb2

from airflow_stepops.testing.modal import _limits
from airflow_stepops.testing.modal._ids import lookup, new_id

DEFAULT_ENVIRONMENT = "main"
IMAGE_BUILDER_VERSION = "2025.06"
_FROM = re.compile(r"^\s*FROM\s+(\S+)", re.IGNORECASE)
_PYTHON_TAG = re.compile(r"^(?:[\w.\-/]+/)?python:(\d+\.\d+(?:\.\d+)?)")


@dataclass
class App:
    id: str
    name: str
    environment: str
    state: int
    created_at: float
    version: int = 0
    deployed_at: float | None = None
    function_ids: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "environment": self.environment,
                "state": api_pb2.AppState.Name(self.state), "version": self.version, "created_at": self.created_at,
                "deployed_at": self.deployed_at, "functions": dict(self.function_ids)}


@dataclass
class Image:
    id: str
    definition: api_pb2.Image
    builder_version: str


@dataclass
class Secret:
    id: str
    name: str | None
    environment: str
    env: dict[str, str]


@dataclass
class Volume:
    id: str
    name: str
    environment: str
    path: Path


@dataclass
class FunctionDef:
    """One function id and the definitions it has had; ``current`` is the published one (or the latest
    created, before the first publish)."""

    id: str
    app_id: str
    name: str
    handle: api_pb2.FunctionHandleMetadata
    versions: list[tuple[list[api_pb2.Function], int, float]] = field(default_factory=list)  # ranked, app version, t
    pending: list[api_pb2.Function] | None = None

    @property
    def ranked(self) -> list[api_pb2.Function]:
        if self.versions:
            return self.versions[-1][0]
        return self.pending or []


class Registry:
    """Environments, apps and the objects deploys make; thread-safe."""

    def __init__(self, volumes_root: Path) -> None:
        self.volumes_root = volumes_root
        self.lock = threading.RLock()
        self.environments: set[str] = {DEFAULT_ENVIRONMENT}
        self.apps: dict[str, App] = {}
        self.images: dict[str, Image] = {}
        self.secrets: dict[str, Secret] = {}
        self.volumes: dict[str, Volume] = {}
        self.mounts: dict[str, str] = {}  # id -> name
        self.functions: dict[str, FunctionDef] = {}

    # ----- environments and apps -------------------------------------------------------------------

    def environment(self, name: str) -> str:
        """The environment a request names ('' is the default); NOT_FOUND when there is no such one."""
        name = name or DEFAULT_ENVIRONMENT
        with self.lock:
            if name not in self.environments:
                raise GRPCError(Status.NOT_FOUND, f"Environment '{name}' not found")
        return name

    def create_app(self, name: str, environment: str, state: int) -> App:
        with self.lock:
            app = App(new_id("ap"), name, self.environment(environment), state, time.time())
            self.apps[app.id] = app
            return app

    def app(self, app_id: str) -> App:
        return lookup(self.apps, self.lock, "App", app_id)

    def deployed_app(self, name: str, environment: str) -> App | None:
        environment = self.environment(environment)
        with self.lock:
            found = [a for a in self.apps.values() if a.name == name and a.environment == environment
                     and a.state == api_pb2.APP_STATE_DEPLOYED]
        return found[-1] if found else None

    def publish(self, request: api_pb2.AppPublishRequest) -> App:
        app = self.app(request.app_id)
        with self.lock:
            if request.name:
                other = self.deployed_app(request.name, app.environment)
                if other is not None and other.id != app.id:
                    raise GRPCError(Status.ALREADY_EXISTS, f"App '{request.name}' is already deployed "
                                                           f"as {other.id}")
                app.name = request.name
            app.state = request.app_state or app.state
            app.version += 1
            app.deployed_at = time.time()
            app.function_ids = dict(request.function_ids)
            for function_id in app.function_ids.values():
                fdef = self.functions.get(function_id)
                if fdef is not None and fdef.pending is not None:
                    fdef.versions.append((fdef.pending, app.version, app.deployed_at))
                    fdef.pending = None
            return app

    # ----- images, secrets, volumes, mounts ------------------------------------------------------------

    def add_image(self, definition: api_pb2.Image, builder_version: str) -> Image:
        with self.lock:
            image = Image(new_id("im"), definition, builder_version or IMAGE_BUILDER_VERSION)
            self.images[image.id] = image
            return image

    def image(self, image_id: str) -> Image:
        return lookup(self.images, self.lock, "Image", image_id)

    def image_layers(self, image_id: str) -> list[Image]:
        """The image and the images it is built on, base first."""
        layers: list[Image] = []
        todo = [image_id]
        with self.lock:
            while todo:
                image = self.images.get(todo.pop())
                if image is None or image in layers:
                    continue
                layers.insert(0, image)
                todo.extend(b.image_id for b in image.definition.base_images)
        return layers

    def registry_tag(self, image_id: str) -> str | None:
        """The image an image is built ``FROM`` (its first layer's; ``FROM base`` lines name the layer below)."""
        for layer in self.image_layers(image_id):
            for command in layer.definition.dockerfile_commands:
                found = _FROM.match(command)
                if found and found.group(1) != "base":
                    return found.group(1)
        return None

    def python_version(self, image_id: str) -> str | None:
        """The Python an image has as its ``python:X.Y[.Z]`` base tag names it (None for other bases)."""
        tag = self.registry_tag(image_id)
        found = _PYTHON_TAG.match(tag) if tag else None
        return found.group(1) if found else None

    def add_secret(self, name: str | None, env: dict[str, str], environment: str = DEFAULT_ENVIRONMENT,
                   *, overwrite: bool = True) -> Secret:
        environment = self.environment(environment)
        with self.lock:
            if name is not None:
                old = self.named_secret(name, environment)
                if old is not None:
                    if not overwrite:
                        raise GRPCError(Status.ALREADY_EXISTS, f"Secret '{name}' already exists")
                    old.env = dict(env)
                    return old
            secret = Secret(new_id("st"), name, environment, dict(env))
            self.secrets[secret.id] = secret
            return secret

    def named_secret(self, name: str, environment: str) -> Secret | None:
        with self.lock:
            return next((s for s in self.secrets.values() if s.name == name and s.environment == environment), None)

    def volume(self, name: str, environment: str, create: bool) -> Volume:
        environment = self.environment(environment)
        with self.lock:
            found = next((v for v in self.volumes.values() if v.name == name and v.environment == environment), None)
            if found is not None:
                return found
            if not create:
                raise GRPCError(Status.NOT_FOUND, f"Volume '{name}' not found in environment '{environment}'")
            path = self.volumes_root / environment / name
            path.mkdir(parents=True, exist_ok=True)
            volume = Volume(new_id("vo"), name, environment, path)
            self.volumes[volume.id] = volume
            return volume

    def add_mount(self, name: str) -> str:
        with self.lock:
            found = next((i for i, n in self.mounts.items() if n == name and name), None)
            if found is not None:
                return found
            mount_id = new_id("mo")
            self.mounts[mount_id] = name
            return mount_id

    # ----- functions ------------------------------------------------------------------------------------

    def precreate(self, request: api_pb2.FunctionPrecreateRequest) -> FunctionDef:
        self.app(request.app_id)
        handle = api_pb2.FunctionHandleMetadata(
            function_name=request.function_name, function_type=request.function_type, app_id=request.app_id,
            supported_input_formats=request.supported_input_formats,
            supported_output_formats=request.supported_output_formats,
            max_object_size_bytes=MAX_OBJECT_SIZE_BYTES, max_async_object_size_bytes=MAX_ASYNC_OBJECT_SIZE_BYTES)
        if request.HasField("function_schema"):
            handle.function_schema.CopyFrom(request.function_schema)
        with self.lock:
            fdef = self.functions.get(request.existing_function_id)
            if fdef is None or fdef.app_id != request.app_id:
                fdef = FunctionDef(new_id("fu"), request.app_id, request.function_name, handle)
                self.functions[fdef.id] = fdef
            else:
                fdef.handle = handle
            return fdef

    def create_function(self, request: api_pb2.FunctionCreateRequest) -> FunctionDef:
        """Check and store a definition (single, or ranked for a GPU fallback list); INVALID_ARGUMENT as
        Modal's server would."""
        app = self.app(request.app_id)
        if request.HasField("function_data"):
            ranked = [r.function for r in sorted(request.function_data.ranked_functions, key=lambda r: r.rank)]
        else:
            ranked = [request.function]
        if not ranked:
            raise GRPCError(Status.INVALID_ARGUMENT, "FunctionCreate without a function definition")
        for fn in ranked:
            _limits.check_function(fn)
            with self.lock:
                missing = ([s for s in fn.secret_ids if s not in self.secrets]
                           + [m.volume_id for m in fn.volume_mounts if m.volume_id not in self.volumes])
            if missing:
                raise GRPCError(Status.NOT_FOUND, f"{missing[0]} not found")
            if fn.image_id:
                self.image(fn.image_id)
        first = ranked[0]
        with self.lock:
            fdef = self.functions.get(request.existing_function_id)
            if fdef is None or fdef.app_id != app.id:
                fdef = FunctionDef(new_id("fu"), app.id, first.function_name, api_pb2.FunctionHandleMetadata(
                    function_name=first.function_name, function_type=first.function_type, app_id=app.id,
                    max_object_size_bytes=MAX_OBJECT_SIZE_BYTES,
                    max_async_object_size_bytes=MAX_ASYNC_OBJECT_SIZE_BYTES))
                self.functions[fdef.id] = fdef
            fdef.pending = ranked
            fdef.handle.function_name = first.function_name
            fdef.handle.function_type = first.function_type
            fdef.handle.definition_id = new_id("de")
            del fdef.handle.supported_input_formats[:]
            fdef.handle.supported_input_formats.extend(first.supported_input_formats)
            del fdef.handle.supported_output_formats[:]
            fdef.handle.supported_output_formats.extend(first.supported_output_formats)
            return fdef

    def function(self, function_id: str) -> FunctionDef:
        with self.lock:
            fdef = self.functions.get(function_id)
        if fdef is None or not fdef.ranked:
            raise GRPCError(Status.NOT_FOUND, f"Function {function_id} not found")
        return fdef

    def lookup_function(self, app_name: str, tag: str, environment: str) -> FunctionDef:
        environment = self.environment(environment)
        app = self.deployed_app(app_name, environment)
        if app is None:
            raise GRPCError(Status.NOT_FOUND, f"App '{app_name}' not found in environment '{environment}'")
        function_id = app.function_ids.get(tag)
        if function_id is None:
            raise GRPCError(Status.NOT_FOUND, f"Function '{tag}' not found in app '{app_name}'")
        return self.function(function_id)

    def function_data(self, fdef: FunctionDef) -> api_pb2.FunctionData:
        """``FunctionData`` as the server answers it: the shared fields plus one ranked function per GPU type."""
        ranked = fdef.ranked
        data = api_pb2.FunctionData()
        first = ranked[0]
        for descriptor in api_pb2.FunctionData.DESCRIPTOR.fields:
            name = descriptor.name
            if name == "ranked_functions" or name not in api_pb2.Function.DESCRIPTOR.fields_by_name:
                continue
            source = api_pb2.Function.DESCRIPTOR.fields_by_name[name]
            if source.type != descriptor.type or source.label != descriptor.label:
                continue
            value = getattr(first, name)
            if descriptor.message_type is not None and descriptor.label != descriptor.LABEL_REPEATED:
                if first.HasField(name):
                    getattr(data, name).CopyFrom(value)
            elif descriptor.label == descriptor.LABEL_REPEATED:
                if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
                    getattr(data, name).update(value)
                elif descriptor.message_type is not None:
                    getattr(data, name).extend(value)
                else:
                    getattr(data, name).extend(list(value))
            else:
                setattr(data, name, value)
        for rank, fn in enumerate(ranked):
            data.ranked_functions.append(api_pb2.FunctionData.RankedFunction(rank=rank, function=fn))
        return data

    def describe(self, fdef: FunctionDef) -> dict[str, Any]:
        """The recorded definition as a plain dict (see ``ModalEmulator.functions``)."""
        ranked = fdef.ranked
        first = ranked[0]
        app = self.app(fdef.app_id)
        gpus = [{"type": fn.resources.gpu_config.gpu_type, "count": fn.resources.gpu_config.count}
                for fn in ranked if fn.resources.gpu_config.count]
        resources = first.resources
        with self.lock:
            secrets = [self.secrets[s] for s in first.secret_ids if s in self.secrets]
            volumes = {m.mount_path: self.volumes[m.volume_id].name for m in first.volume_mounts
                       if m.volume_id in self.volumes}
        layers = self.image_layers(first.image_id) if first.image_id else []
        commands = [c for layer in layers for c in layer.definition.dockerfile_commands]
        registry = self.registry_tag(first.image_id) if first.image_id else None
        python = self.python_version(first.image_id) if first.image_id else None
        version = fdef.versions[-1][1] if fdef.versions else None
        return {
            "id": fdef.id, "app_id": app.id, "app_name": app.name, "environment": app.environment,
            "name": first.function_name, "module_name": first.module_name, "app_version": version,
            "gpu": [g["type"] if g["count"] == 1 else f"{g['type']}:{g['count']}" for g in gpus], "gpus": gpus,
            "milli_cpu": resources.milli_cpu, "cpu": resources.milli_cpu / 1000 if resources.milli_cpu else None,
            "memory_mb": resources.memory_mb or None,
            "milli_cpu_max": resources.milli_cpu_max or None, "memory_mb_max": resources.memory_mb_max or None,
            "timeout_secs": first.timeout_secs, "regions": list(first.scheduler_placement.regions),
            "nonpreemptible": first.scheduler_placement.nonpreemptible,
            "cloud": first.cloud_provider_str or None,
            "image": {"id": first.image_id, "commands": commands, "registry": registry,
                      "python_version": ".".join(python.split(".")[:2]) if python else None,
                      "builder_version": layers[-1].builder_version if layers else None,
                      "layers": [list(layer.definition.dockerfile_commands) for layer in layers]},
            "secrets": [{"id": s.id, "name": s.name, "environment": s.environment, "env": dict(s.env)}
                        for s in secrets],
            "volumes": volumes,
            "retries": first.retry_policy.retries if first.HasField("retry_policy") else 0,
            "serialized": first.definition_type == api_pb2.Function.DEFINITION_TYPE_SERIALIZED,
        }
