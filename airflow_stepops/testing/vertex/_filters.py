"""The filter subsets the emulator understands: Vertex AI's list filter (AIP-160) and Cloud Logging's.

Both are conjunctions of comparisons ``FIELD OP VALUE`` (``OP`` one of ``= != > >= < <= :``; ``VALUE``
quoted or bare). Vertex joins them with ``AND``; Logging also takes whitespace or newlines for AND.
``OR``, ``NOT``, parentheses and unknown fields answer 400 INVALID_ARGUMENT naming what was not
understood, rather than silently matching too much: a test then learns its filter is not emulated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airflow_stepops.testing.vertex._errors import invalid_argument
from airflow_stepops.testing.vertex._time import parse_rfc3339

JSON = dict[str, Any]
Predicate = Callable[[JSON], bool]

_CLAUSE = re.compile(r'\s*(?P<field>[A-Za-z_][\w.\-/]*(?:\."[^"]*")?)\s*(?P<op>!=|>=|<=|=|>|<|:)\s*'
                     r'(?P<value>"(?:[^"\\]|\\.)*"|[^\s"()]+)')
_AND = re.compile(r"\s+AND\s+", re.IGNORECASE)
_IMPLICIT_AND = re.compile(r"\s+(?!(?:OR|NOT)\b)", re.IGNORECASE)
_ORDERED = (">", ">=", "<", "<=")
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}
SEVERITIES = ("DEFAULT", "DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL", "ALERT", "EMERGENCY")


@dataclass(frozen=True)
class Clause:
    field: str
    op: str
    value: str
    text: str


def parse(text: str, *, implicit_and: bool = False) -> list[Clause]:
    """The comparisons of a conjunction; INVALID_ARGUMENT at the first thing that is not one."""
    clauses: list[Clause] = []
    pos, text = 0, text.strip()
    joiner = _IMPLICIT_AND if implicit_and else _AND
    while pos < len(text):
        found = _CLAUSE.match(text, pos)
        if found is None:
            raise invalid_argument(f'Unsupported filter near "{text[pos:].strip()}" in "{text}": the emulator '
                                   "understands comparisons (FIELD OP VALUE) joined by AND only")
        value = found.group("value")
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        clauses.append(Clause(found.group("field"), found.group("op"), value, found.group(0).strip()))
        pos = found.end()
        if pos >= len(text):
            break
        sep = _AND.match(text, pos) or joiner.match(text, pos)
        if sep is None:
            raise invalid_argument(f'Unsupported filter near "{text[pos:].strip()}" in "{text}": the emulator '
                                   "understands comparisons joined by AND only (no OR, NOT or parentheses)")
        pos = sep.end()
    return clauses


def _unsupported(clause: Clause, what: str) -> Exception:
    return invalid_argument(f'Unsupported filter "{clause.text}": {what}')


def _time_value(clause: Clause) -> int:
    try:
        return parse_rfc3339(clause.value)
    except ValueError:
        raise invalid_argument(f'Invalid filter "{clause.text}": {clause.value!r} is not an RFC 3339 timestamp')


def _string_match(clause: Clause, actual: str | None, *, has_is_substring: bool) -> bool:
    if clause.op == ":":
        if clause.value == "*":
            return actual is not None
        return actual is not None and (clause.value in actual if has_is_substring else actual == clause.value)
    if clause.op not in ("=", "!="):
        raise _unsupported(clause, "strings compare with =, != and : only")
    value = clause.value
    if value.endswith("*") and not has_is_substring:  # AIP-160: a trailing * matches a prefix
        hit = actual is not None and actual.startswith(value[:-1])
    else:
        hit = actual == value
    return hit if clause.op == "=" else not hit


# ----- Vertex AI ListCustomJobs ------------------------------------------------------------------------

_JOB_FIELDS = {"state": "state", "display_name": "displayName", "displayName": "displayName",
               "create_time": "createTime", "createTime": "createTime", "update_time": "updateTime",
               "updateTime": "updateTime", "start_time": "startTime", "end_time": "endTime"}


def job_filter(text: str, states: frozenset[str]) -> Predicate:
    """A predicate over CustomJob JSON (camelCase) for a ListCustomJobs ``filter``."""
    tests: list[Predicate] = []
    for clause in parse(text) if text.strip() else []:
        tests.append(_job_test(clause, states))
    return lambda job: all(t(job) for t in tests)


def _job_test(clause: Clause, states: frozenset[str]) -> Predicate:
    name = clause.field
    if name.startswith("labels."):
        key = name[len("labels."):].strip('"')
        if clause.op not in ("=", "!=", ":"):
            raise _unsupported(clause, "labels compare with =, != and : only")
        return lambda job: _string_match(clause, (job.get("labels") or {}).get(key), has_is_substring=False)
    field = _JOB_FIELDS.get(name)
    if field is None:
        raise _unsupported(clause, f"the emulator filters on labels.KEY, {', '.join(sorted(set(_JOB_FIELDS)))}")
    if field == "state":
        if clause.value not in states:
            raise invalid_argument(f'Invalid filter "{clause.text}": {clause.value!r} is not a JobState')
        if clause.op not in ("=", "!="):
            raise _unsupported(clause, "state compares with = and != only")
        return lambda job: (job.get("state") == clause.value) == (clause.op == "=")
    if field == "displayName":
        return lambda job: _string_match(clause, job.get("displayName"), has_is_substring=False)
    if clause.op == ":":
        raise _unsupported(clause, "times compare with =, !=, >, >=, < and <=")
    wanted = _time_value(clause)
    compare = _COMPARE[clause.op]
    return lambda job: job.get(field) is not None and compare(parse_rfc3339(job[field]), wanted)


# ----- Cloud Logging entries:list ----------------------------------------------------------------------

def log_filter(text: str) -> Predicate:
    """A predicate over LogEntry JSON for an ``entries:list`` ``filter``."""
    tests = [_log_test(clause) for clause in (parse(text, implicit_and=True) if text.strip() else [])]
    return lambda entry: all(t(entry) for t in tests)


def _log_test(clause: Clause) -> Predicate:
    name = clause.field
    if name in ("timestamp", "receiveTimestamp", "receive_timestamp"):
        if clause.op == ":":
            raise _unsupported(clause, "timestamps compare with =, !=, >, >=, < and <=")
        wanted = _time_value(clause)
        key = "timestamp" if name == "timestamp" else "receiveTimestamp"
        compare = _COMPARE[clause.op]
        return lambda e: compare(parse_rfc3339(e[key]), wanted)
    if name in ("insertId", "insert_id"):
        if clause.op == ":":
            return lambda e: _string_match(clause, e.get("insertId"), has_is_substring=True)
        compare = _COMPARE[clause.op]
        return lambda e: compare(e.get("insertId", ""), clause.value)
    if name == "severity":
        level = clause.value.upper()
        if level not in SEVERITIES:
            raise invalid_argument(f'Invalid filter "{clause.text}": {clause.value!r} is not a LogSeverity')
        if clause.op == ":":
            raise _unsupported(clause, "severity compares with =, !=, >, >=, < and <=")
        compare = _COMPARE[clause.op]
        return lambda e: compare(SEVERITIES.index(e.get("severity", "DEFAULT")), SEVERITIES.index(level))
    if clause.op in _ORDERED:
        raise _unsupported(clause, f"{name} compares with =, != and : only")
    if name == "resource.type":
        return lambda e: _string_match(clause, e["resource"]["type"], has_is_substring=True)
    if name in ("logName", "log_name"):
        return lambda e: _string_match(clause, e.get("logName"), has_is_substring=True)
    if name in ("textPayload", "text_payload"):
        return lambda e: _string_match(clause, e.get("textPayload"), has_is_substring=True)
    for prefix, pick in (("resource.labels.", lambda e: e["resource"].get("labels") or {}),
                         ("labels.", lambda e: e.get("labels") or {})):
        if name.startswith(prefix):
            key = name[len(prefix):].strip('"')
            return lambda e, key=key, pick=pick: _string_match(clause, pick(e).get(key), has_is_substring=True)
    raise _unsupported(clause, "the emulator filters on resource.type, resource.labels.KEY, labels.KEY, logName, "
                               "textPayload, timestamp, receiveTimestamp, insertId and severity")
