"""A remote exception becomes a local one of the same builtin type that reads like a Python traceback."""

from __future__ import annotations

import builtins
import pickle
import traceback

import pytest

from airflow_stepops import RemoteStepError
from airflow_stepops.exceptions import rebuild_remote_error

TRACEBACK = 'Traceback (most recent call last):\n  File "dag.py", line 9, in train\n    rows["ti"]\n'
BUILTINS = sorted(n for n, o in vars(builtins).items() if isinstance(o, type) and issubclass(o, Exception))


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_type_keeps_message_and_traceback_on_their_own_lines(name):
    # KeyError's str() is the repr of its argument, Unicode*Error's is built from its fields, ...
    err = rebuild_remote_error(f"builtins.{name}", "'missing key'", TRACEBACK)
    lines = str(err).splitlines()
    assert lines[0] == f"builtins.{name}: 'missing key'"
    assert 'File "dag.py", line 9, in train' in lines[4] and lines[2] == "Remote traceback:"
    assert "".join(traceback.format_exception_only(type(err), err)).count("\n") > 3  # what the task log shows
    assert isinstance(err, RemoteStepError) and str(pickle.loads(pickle.dumps(err))) == str(err)
    if name != "ExceptionGroup":  # it cannot exist without sub-exceptions: carried by name only
        assert isinstance(err, getattr(builtins, name))


def test_a_remote_key_error_is_except_key_error_able():
    with pytest.raises(KeyError) as info:
        raise rebuild_remote_error("builtins.KeyError", "'ti'", TRACEBACK)
    assert str(info.value).startswith("builtins.KeyError: 'ti'\n")
