"""A step's ``requirements``: pip requirements its job installs when it starts (``runtime/entry.py``).

Given as a list of requirement specifiers or as the path of a requirements file (relative to the DAG file's
folder); either way the text travels in the step's bundle, so nothing the job cannot read may be named in it:
no ``-r``/``-c`` includes, editable installs or local paths. Checked when the DAG file is parsed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

#: pip options that name other files, which do not travel with the step
_INCLUDES = ("-r", "--requirement", "-c", "--constraint", "-e", "--editable")
#: pip options a requirements file may carry (https://pip.pypa.io/en/stable/reference/requirements-file-format/)
_OPTIONS = ("-i", "--index-url", "--extra-index-url", "--no-index", "-f", "--find-links", "--pre",
            "--prefer-binary", "--only-binary", "--no-binary", "--trusted-host", "--use-feature", "--require-hashes")
#: options that take a location: it must be a URL the job can reach
_LOCATIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links")
#: a requirement given as a URL (https://.../pkg.whl, git+https://...), which pip takes on a line of its own
_URL = re.compile(r"^(https?|git\+[a-z]+)://")
_COMMENT = re.compile(r"(^|\s)#.*$")


def check_line(line: str, where: str) -> None:
    """Refuse a line pip would refuse or the job could not honour, naming it and what is allowed."""
    from packaging.requirements import InvalidRequirement, Requirement

    text = _COMMENT.sub("", line).strip()
    if not text:
        return
    option, _, value = text.replace("=", " ", 1).partition(" ")
    if option in _INCLUDES:
        raise ValueError(f"{where}: {line!r} names another file, which does not travel with the step; list its "
                         "requirements here instead")
    if text.startswith("-"):
        if option not in _OPTIONS:
            raise ValueError(f"{where}: {line!r}: pip option {option!r} is not allowed here; allowed: "
                             f"{', '.join(_OPTIONS)}")
        if option in _LOCATIONS and not _URL.match(value.strip()):
            raise ValueError(f"{where}: {line!r}: {option} must be a URL the job can reach (local paths do not "
                             "travel with the step)")
        return
    if _URL.match(text):
        return
    if "file:" in text:
        raise ValueError(f"{where}: {line!r} names a local file, which does not travel with the step; publish the "
                         "package to an index, or use a 'name @ https://...' URL")
    try:
        Requirement(re.split(r"\s--", text, maxsplit=1)[0].strip())  # per-requirement options: --hash, ...
    except InvalidRequirement as exc:
        hint = (" (local paths do not travel with the step: publish the package to an index, or use a "
                "'name @ https://...' URL)" if os.sep in text or text.startswith(".") else "")
        raise ValueError(f"{where}: {line!r} is not a requirement specifier such as 'numpy>=1.26' or "
                         f"'torch==2.4.*; python_version >= \"3.10\"': {str(exc).splitlines()[0]}{hint}") from None


def check_list(values: Sequence[str], where: str = "requirements") -> list[str]:
    """A list of requirement specifiers (or pip options), one per item."""
    for index, value in enumerate(values):
        if "\n" in value:
            raise ValueError(f"{where}[{index}]: {value!r}: give one requirement per item")
        check_line(value, f"{where}[{index}]")
    return list(values)


def resolve_file(value: str, folder: str | None, where: str = "requirements") -> Path:
    """The requirements file ``value`` names (relative paths: to ``folder``, the DAG file's), which must exist."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(folder or os.getcwd()) / path
    if not path.is_file():
        raise ValueError(f"{where}: requirements file {value!r} does not exist (looked for {path}); give a file "
                         "path relative to the DAG file's folder, or a list of requirements")
    return path


def read_file(value: str, folder: str | None, where: str = "requirements") -> str:
    """The checked text of the requirements file ``value``."""
    path = resolve_file(value, folder, where)
    text = path.read_text(encoding="utf-8")
    joined, first = "", 1
    for number, line in enumerate(text.splitlines(), start=1):
        if not joined:
            first = number
        joined += line
        if line.endswith("\\"):  # continued on the next line (pip-compile --generate-hashes writes these)
            joined = joined[:-1] + " "
            continue
        check_line(joined, f"{where} ({path.name}, line {first})")
        joined = ""
    if joined:
        check_line(joined, f"{where} ({path.name}, line {first})")
    return text


def requirements_text(value: str | Sequence[str] | None, folder: str | None) -> str:
    """What the job installs, as requirements.txt text ("" for nothing)."""
    if not value:
        return ""
    if isinstance(value, str):
        return read_file(value, folder)
    return "\n".join(check_list(value)) + "\n"
