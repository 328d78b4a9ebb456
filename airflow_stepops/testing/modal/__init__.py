"""A local Modal whose function calls run as local processes.

One grpclib server (127.0.0.1, a free port, its own thread and event loop) answers the ``modal.client.
ModalClient`` RPCs of Modal's control plane, and an aiohttp server on the same loop stands in for blob
storage. The real ``modal`` client (1.6) talks to them unchanged::

    import modal
    from airflow_stepops.testing.modal import ModalEmulator

    with ModalEmulator(stop_grace_period=1) as emu:
        os.environ.update(emu.env())  # MODAL_SERVER_URL, MODAL_TOKEN_ID, MODAL_TOKEN_SECRET, MODAL_ENVIRONMENT
        client = modal.Client.from_credentials(emu.token_id, emu.token_secret)
        app = modal.App("stepops-abc123")
        app.function(serialized=True, name="run_step", gpu=["H100", "A100-80GB"], timeout=3600)(run_step)
        app.deploy(name="stepops-abc123", environment_name="main", client=client)
        call = modal.Function.from_name("stepops-abc123", "run_step", client=client).spawn(b"bundle", "src", {})
        emu.wait_for_call(call.object_id, "success")

Auth: every RPC must carry the emulator's token (``token_id`` / ``token_secret``, random ``ak-...`` /
``as-...``) as ``Client.from_credentials`` and ``Client.from_env`` send it, else UNAUTHENTICATED (the client
raises ``AuthError``). ``airflow_connection()`` is an Airflow ``modal`` connection (login, password, extra
``{"environment": "main"}``).

Deploys: ClientHello, EnvironmentGetOrCreate (``main``; ``add_environment`` for more), AppGetByDeploymentName,
AppCreate, AppGetOrCreate, AppGetLayout, AppHeartbeat, AppClientDisconnect, AppPublish (a new app version
per deploy; function ids are kept), ImageGetOrCreate + ImageJoinStreaming (no build: success at once),
SecretGetOrCreate (named secrets from ``add_secret``, else NOT_FOUND; ``Secret.from_dict`` ones),
VolumeGetOrCreate (a directory per volume under the workdir: its committed state), MountGetOrCreate, FunctionPrecreate and
FunctionCreate, which refuses with INVALID_ARGUMENT what Modal refuses (unknown GPU types, GPU counts above
8, or 4 for A10; timeouts outside 1 s .. 24 h; see ``_limits``). A GPU fallback list arrives as
``FunctionData.ranked_functions``: one copy of the function per type, in order. ``functions`` /
``function(app, name)`` show each recorded definition.

Calls: FunctionGet / FunctionGetById, FunctionMap (one input: ``.spawn()`` and ``.remote()``),
FunctionGetOutputs (long polls up to the request's timeout; outputs stay readable unless cleared on success),
FunctionCallFromId, FunctionCallGetInfo, FunctionGetCallGraph, FunctionCallCancel, BlobCreate (single or
multipart upload URLs) and BlobGet. An input is pending for ``queue_seconds``, then runs on a task: this
interpreter running the pickled function (``_container``) as its own process group, with the host's
environment minus ``STEPOPS_*``, the function's secrets and Modal's ``MODAL_*`` variables (see
``_runner``). Results and exceptions come back as Modal's container packs them into a ``GenericResult``
(pickled value or exception with its traceback; through a blob when larger than the inline limit: 8 KiB for
spawned calls, 2 MiB for ``.remote()``). Past the function's timeout, and on cancel, the group gets
SIGTERM, SIGKILL after ``stop_grace_period``; the input ends GENERIC_STATUS_TIMEOUT ("Task's current input
<id> hit its timeout of <N>s", raised as ``FunctionTimeoutError``) or GENERIC_STATUS_TERMINATED (raised as
``RemoteError``). An output is dropped 7 days after its call ended, as Modal's job-queue guide says (then
``get`` raises ``OutputExpiredError``); ``emu.age(fc_id, seconds)`` makes a call that much older. With
``emu.uncounted_queue_seconds`` set, a queued input is not counted as unfinished for that long after its call
was made, so a call just spawned shows what an expired one shows (no output, no unfinished input).

Volumes: a task works on its own copy of each mounted volume's committed state, and the mount path in the
call's string arguments points at that copy (nothing can mount at the function's path on this host). Its
changes reach the volume by background commits (every ``volume_commit_interval`` seconds, default 5) and
when its process exits by itself or within the stop grace period (a preempted, cancelled or timed-out
container that exits on SIGTERM commits; one killed with SIGKILL does not), as Modal documents; see ``_volumes``.

Dicts: DictGetOrCreate (named), DictUpdate (also ``if_not_exists``), DictGet and DictPop, keys and values compared as
the serialized bytes the client sends (``Dict.from_name``, ``put``, ``get``, ``pop``).

Logs: AppFetchLogs, AppCountLogs and the AppGetLogs stream over the lines containers write (stdout, stderr)
and the service's own (container start, timeout, cancel, preemption), with nanosecond timestamps and the
app / function / call / input / task ids; ``call.logs.fetch``, ``.tail`` and ``.stream`` work. Entries are
numbered as they arrive (AppGetLogs resumes after ``last_entry_id``); ``emu.late_logs(every=3, seconds=1)``
makes every third entry arrive late, behind later ones, with its own earlier timestamp.

Faults: ``emu.inject("preemption", call=fc_id, after=1, restart=True)`` (restarted on a new task, as Modal
does; without ``restart`` the input ends GENERIC_STATUS_INTERNAL_FAILURE, as Modal reports a lost input it gives
up on), ``"failure"`` (``message``),
``"slow_start"`` (``duration``), ``"no_capacity"`` (``gpu="H100"``: fallbacks get the next type, others wait
until ``clear_faults()``); ``emu.fail_requests(Status.UNAVAILABLE, times=2, method="FunctionMap")``;
``emu.lose_replies("FunctionMap", times=1)`` (the request is carried out, its reply never sent). FunctionMap
answers a request repeating an earlier one's ``x-idempotency-key`` with that request's call, as the modal
client's retries (one key for all attempts of a request) expect.
Inspection: ``apps``, ``functions``, ``function``, ``calls``, ``call``, ``wait_for_call``, ``pids``, ``pid``,
``logs``, ``log_entries``, ``requests``, ``request_log``, ``blob_uploads``, ``volume_path``.

Not emulated: every other RPC (UNIMPLEMENTED naming it): classes, ``.map()`` / ``.spawn_map()``, generators,
web endpoints, sandboxes, other dict RPCs, queues, the input plane; image builds (no image is pulled: the process runs
this interpreter with the emulator's ``sys.path``, standing in for Modal mounting local source); file-based
(not serialized) functions (INIT_FAILURE); volume mounts at their paths (only the call's arguments are
rewritten, not paths the function names itself), ``Volume.commit()`` / ``reload()`` from inside a container
(VolumeCommit, VolumeReload); client-side retries of failed inputs (``retries`` is recorded), concurrency, autoscaling,
schedules, CPU and memory limits; ``MODAL_IS_REMOTE`` (clients inside keep the host's token).

This package's names load lazily: each call's container process imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_stepops.testing.modal._emulator import ModalEmulator
    from airflow_stepops.testing.modal._faults import Fault, FaultRule, RequestFault

_EXPORTS = {
    "ModalEmulator": "airflow_stepops.testing.modal._emulator",
    "Fault": "airflow_stepops.testing.modal._faults",
    "FaultRule": "airflow_stepops.testing.modal._faults",
    "RequestFault": "airflow_stepops.testing.modal._faults",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
