"""A container's entrypoint: ``python -m airflow_stepops.testing.modal._container <call dir>``.

It does for one input what Modal's container entrypoint does: load the function (the ``function_serialized``
cloudpickle of ``FunctionCreate``, in ``function.pkl``) and the input (``(args, kwargs)`` in the input's data
format, in ``input.bin``; mount paths in its strings rewritten to the task's copies of the volumes, see
``remount``), call it (awaiting a coroutine), and write the outcome to ``result.pkl`` the way
the container's IO manager packs a ``GenericResult``: on success the serialized return value; on an
exception its ``repr``, ``traceback.format_exc()``, the pickled exception and the pickled traceback (tblib's
dict, file names prefixed with ``<task id>:``, and the line cache) that the client re-raises with, after
printing the traceback to stderr so it is logged. If the function cannot be loaded the status is
INIT_FAILURE. The emulator turns ``result.pkl`` into the call's output (inline, or a blob when large).

Importing ``modal`` takes about a second, so the loader does without it: pickles made by the client name
Modal's vendored cloudpickle (``modal._vendor.cloudpickle``), which is loaded from its file on its own;
``modal`` itself is imported only for a pickle that refers to Modal objects.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import io
import json
import pickle
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

PICKLE_PROTOCOL = 4  # as modal._serialization
DATA_FORMAT_PICKLE, DATA_FORMAT_CBOR = 1, 4
STATUS_SUCCESS, STATUS_FAILURE, STATUS_INIT_FAILURE = 1, 2, 5


def vendored(name: str) -> ModuleType:
    """``modal._vendor.<name>`` (cloudpickle, tblib: standard library only) without importing ``modal``."""
    qualified = f"modal._vendor.{name}"
    if qualified not in sys.modules:
        package = importlib.util.find_spec("modal")  # finds, does not import
        if package is None or not package.submodule_search_locations:
            raise ModuleNotFoundError("the modal package is not installed")
        path = Path(next(iter(package.submodule_search_locations))) / "_vendor" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(qualified, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
    return sys.modules[qualified]


class _ModalObjectsInside(Exception):
    """The pickle refers to Modal objects (persistent ids): only ``modal`` itself can load it."""


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        raise _ModalObjectsInside(pid)

    def find_class(self, module: str, name: str) -> Any:
        # pickle's own lookup imports the top-level package too (all of ``modal`` for its vendored cloudpickle)
        loaded = sys.modules.get(module)
        if loaded is not None and "." not in name:
            return getattr(loaded, name)
        return super().find_class(module, name)


def loads(data: bytes, data_format: int = DATA_FORMAT_PICKLE) -> Any:
    if data_format == DATA_FORMAT_CBOR:
        import cbor2

        return cbor2.loads(data)
    vendored("cloudpickle")
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except _ModalObjectsInside:
        from modal._serialization import deserialize

        return deserialize(data, None)


def dumps(obj: Any, data_format: int = DATA_FORMAT_PICKLE) -> bytes:
    if data_format == DATA_FORMAT_CBOR:
        import cbor2

        return cbor2.dumps(obj)
    return vendored("cloudpickle").dumps(obj, protocol=PICKLE_PROTOCOL)


def pickle_exception(exc: BaseException) -> bytes:
    try:
        return dumps(exc)
    except Exception as failure:  # as Modal's pickle_exception: send what can be sent
        return dumps(RuntimeError(f"Failed to serialize exception {exc} of type {type(exc)}: {failure}"))


def pickle_traceback(exc: BaseException, task_id: str) -> tuple[bytes, bytes]:
    """tblib's dict of the traceback (file names prefixed with ``<task id>:``, as Modal marks remote frames)
    and the (file, line) -> source line cache; empty when that fails, as in Modal."""
    try:
        tb = vendored("tblib").Traceback(exc.__traceback__)
        cur = tb
        while cur is not None:
            name = cur.tb_frame.f_code.co_filename
            if name.startswith("<"):
                break
            cur.tb_frame.f_code.co_filename = f"<{task_id}>:{name}"
            cur = cur.tb_next
        line_cache = {(f.filename, f.lineno): f.line for f in traceback.extract_tb(exc.__traceback__)}
        return dumps(tb.to_dict()), dumps(line_cache)
    except Exception:
        return b"", b""


def remount(value: Any, mounts: dict[str, str], depth: int = 0) -> Any:
    """``value`` with every string naming a volume's mount path (or a path under it) pointing at the task's
    copy of the volume instead: nothing can mount at an absolute path of this host."""
    if not mounts or depth > 32:
        return value
    if isinstance(value, str):
        for path, local in mounts.items():
            root = path.rstrip("/")
            if value == root or value.startswith(root + "/"):
                return local + value[len(root):]
        return value
    if type(value) in (list, tuple):
        return type(value)(remount(item, mounts, depth + 1) for item in value)
    if type(value) is dict:
        return {key: remount(item, mounts, depth + 1) for key, item in value.items()}
    return value


def _call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        async def wait() -> Any:
            return await result

        result = asyncio.run(wait())
    return result


def run(call_dir: Path) -> dict[str, Any]:
    meta = json.loads((call_dir / "call.json").read_text())
    task_id = meta["task_id"]
    try:
        fn = loads((call_dir / "function.pkl").read_bytes())
        if not callable(fn):
            raise TypeError(f"the serialized function is a {type(fn).__name__}, not a callable")
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        return _failure(exc, task_id, STATUS_INIT_FAILURE)
    try:
        args, kwargs = loads((call_dir / "input.bin").read_bytes(), meta["data_format"])
        args, kwargs = remount(args, meta.get("mounts") or {}), remount(kwargs, meta.get("mounts") or {})
        value = _call(fn, tuple(args), dict(kwargs))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        return _failure(exc, task_id, STATUS_FAILURE)
    output_format = meta.get("output_format") or meta["data_format"]
    return {"status": STATUS_SUCCESS, "data": dumps(value, output_format), "data_format": output_format}


def _failure(exc: BaseException, task_id: str, status: int) -> dict[str, Any]:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:  # the user's frames only
        tb = tb.tb_next
    exc.__traceback__ = tb or exc.__traceback__
    traceback.print_exception(exc)  # to stderr: logged, as Modal prints it
    serialized_tb, tb_line_cache = pickle_traceback(exc, task_id)
    return {"status": status, "exception": repr(exc), "traceback": "".join(traceback.format_exception(exc)),
            "data": pickle_exception(exc), "data_format": DATA_FORMAT_PICKLE, "serialized_tb": serialized_tb,
            "tb_line_cache": tb_line_cache}


def main(argv: list[str]) -> int:
    call_dir = Path(argv[0])
    outcome = run(call_dir)
    tmp = call_dir / "result.pkl.tmp"
    tmp.write_bytes(pickle.dumps(outcome, protocol=PICKLE_PROTOCOL))
    tmp.replace(call_dir / "result.pkl")
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
