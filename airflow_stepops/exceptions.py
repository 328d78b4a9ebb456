"""Errors raised by step operators; each names what went wrong and what is allowed."""

from __future__ import annotations

from airflow_stepops._compat import AirflowException, AirflowFailException


class StepOperatorConfigError(ValueError):
    """Invalid settings, connection or arguments: raised before anything is submitted."""


class StepCapacityError(StepOperatorConfigError):
    """The backend has no capacity for the step (insufficient capacity, stockout, quota, unschedulable, queued past
    ``max_queue_seconds``): nothing of the step ran. ``reason`` is one of ``hooks.base.CAPACITY_REASONS``; with a
    list of step operators the step moves on to the next one."""

    def __init__(self, message: str, reason: str = "insufficient_capacity") -> None:
        super().__init__(message)
        self.reason = reason


class StepPreemptedError(AirflowException):
    """The backend took the machine away (spot/preemptible capacity, eviction): not a user error."""


class StepTimeoutError(AirflowException):
    """The step ran past its Airflow ``execution_timeout``; the remote job was stopped."""


class StepFailedError(AirflowException):
    """The remote job failed without a Python exception from the step (crash, OOM kill, cancel)."""


class StepCostLimitError(StepFailedError, AirflowFailException):
    """The step would cost, or did cost, its ``max_cost``: refused before submitting (it cannot fit, or its price is
    unknown), or stopped when its accrued cost reached the limit. Not retried: a retry would spend it again."""


class StepRequirementsError(StepFailedError):
    """The job could not install the step's ``requirements`` (pip failed, or the image has no pip)."""


class RemoteStepError(AirflowException):
    """The step's own code raised remotely; carries the remote type, message and traceback."""

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(self._describe(remote_type, message, remote_traceback))

    def _describe(self, remote_type: str, message: str, remote_traceback: str) -> str:
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        self.text = f"{remote_type}: {message}"
        if remote_traceback:
            self.text += f"\n\nRemote traceback:\n{remote_traceback.rstrip()}"
        return self.text

    def __str__(self) -> str:
        # the text as given: some builtins render str() their own way (KeyError quotes it into one repr line)
        return self.text

    def __reduce__(self):  # keep picklable despite the custom __init__
        return (rebuild_remote_error, (self.remote_type, self.remote_message, self.remote_traceback))


_BUILTIN_EXCEPTIONS = {
    name: obj
    for name, obj in vars(__import__("builtins")).items()
    if isinstance(obj, type) and issubclass(obj, Exception)
}
_REMOTE_CLASSES: dict[str, type[RemoteStepError]] = {}


def rebuild_remote_error(remote_type: str, message: str, remote_traceback: str = "") -> AirflowException:
    """Build the exception to raise for a remote one.

    An error of this module (the runtime failing, not the step: e.g. ``StepRequirementsError``) is raised as
    itself. A remote builtin exception (``ValueError`` ...) comes back as a class that is both a
    ``RemoteStepError`` and that builtin, so ``except ValueError`` in callers and retry policies
    keeps working. Other types are carried by name only: remote bytes are never unpickled.
    """
    own = globals().get(remote_type.removeprefix(f"{__name__}."))
    if remote_type.startswith(f"{__name__}.") and isinstance(own, type) and issubclass(own, StepFailedError):
        return own(f"{message}\n\n{remote_traceback.rstrip()}" if remote_traceback else message)
    short = remote_type.removeprefix("builtins.")
    builtin = _BUILTIN_EXCEPTIONS.get(short)
    if builtin is None or builtin is Exception:
        return RemoteStepError(remote_type, message, remote_traceback)
    cls = _REMOTE_CLASSES.get(short)
    if cls is None:
        try:
            cls = type(f"Remote{short}", (RemoteStepError, builtin), {"__module__": __name__})
        except TypeError:  # layout conflict with some builtin (e.g. OSError subclasses)
            return RemoteStepError(remote_type, message, remote_traceback)
        _REMOTE_CLASSES[short] = cls
    try:
        return cls(remote_type, message, remote_traceback)
    except TypeError:  # builtins whose constructor needs specific arguments (UnicodeDecodeError, ...)
        pass
    try:
        error = cls.__new__(cls)  # still that builtin, built without its constructor
    except TypeError:  # ExceptionGroup validates in __new__: only the remote type's name is kept
        return RemoteStepError(remote_type, message, remote_traceback)
    error.args = (error._describe(remote_type, message, remote_traceback),)
    return error
