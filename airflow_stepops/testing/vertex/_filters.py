"""The filters the emulator understands: Vertex AI's list filter (AIP-160) and a subset of Cloud Logging's.

Vertex's is AIP-160's whole grammar (AND, OR, NOT / ``-``, parentheses) on the fields its reference
documents; see below. Logging's is a conjunction of comparisons ``FIELD OP VALUE`` (``OP`` one of
``= != > >= < <= :``; ``VALUE`` quoted or bare) joined by ``AND``, whitespace or newlines; its ``OR``,
``NOT``, parentheses and unknown fields answer 400 INVALID_ARGUMENT naming what was not understood,
rather than silently matching too much: a test then learns its filter is not emulated.
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
#
# The grammar is AIP-160's (https://google.aip.dev/160, EBNF https://google.aip.dev/assets/misc/
# ebnf-filtering.txt): ``expression = sequence {"AND" sequence}``, ``sequence = factor {factor}``,
# ``factor = term {"OR" term}``, ``term = ["NOT" | "-"] simple``, ``simple = restriction | "(" expression
# ")"``, ``restriction = member comparator arg``; AND, OR and NOT are upper case; OR binds tighter than
# AND. The fields are those ListCustomJobsRequest.filter documents
# (https://cloud.google.com/vertex-ai/docs/reference/rest/v1/projects.locations.customJobs/list):
# ``display_name`` (=, != and the : wildcard), ``state`` (=, !=), ``create_time`` (=, !=, <, <=, >, >=,
# RFC 3339) and ``labels`` ("labels.key=value", "labels.key:*"). Anything else answers 400.

_TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|(?P<op><=|>=|!=|=|<|>|:)'
                    r'|(?P<punct>[.(),])|(?P<text>[^\s.,:()<>=!"\']+))')
_KEYWORDS = ("AND", "OR", "NOT")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while text[pos:].strip():
        found = _TOKEN.match(text, pos)
        if found is None:
            raise invalid_argument(f'Invalid filter "{text}": unexpected "{text[pos:].strip()[:20]}"')
        kind = found.lastgroup or ""
        value = found.group(kind)
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        elif kind == "text" and value in _KEYWORDS:
            kind = value
        out.append((kind, value))
        pos = found.end()
    return out


class _JobFilter:
    """A recursive-descent parse of one ListCustomJobs filter into a predicate over CustomJob JSON."""

    def __init__(self, text: str, states: frozenset[str]) -> None:
        self.text, self.states = text, states
        self.tokens, self.pos = _tokens(text), 0

    def _peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def _take(self, kind: str) -> str:
        found, value = self._peek()
        if found != kind:
            raise invalid_argument(f'Invalid filter "{self.text}": expected {kind} near "{value or "the end"}"')
        self.pos += 1
        return value

    def parse(self) -> Predicate:
        if not self.tokens:
            return lambda job: True
        test = self._expression()
        if self.pos != len(self.tokens):
            raise invalid_argument(f'Invalid filter "{self.text}": unexpected "{self._peek()[1]}"')
        return test

    def _expression(self) -> Predicate:
        return self._joined(self._sequence, "AND", all)

    def _joined(self, part: Callable[[], Predicate], keyword: str, combine: Callable[[Any], bool]) -> Predicate:
        """``part`` (``keyword`` ``part``)*, true when ``combine`` (all / any) of the parts is."""
        parts = [part()]
        while self._peek()[0] == keyword:
            self.pos += 1
            parts.append(part())
        return parts[0] if len(parts) == 1 else (lambda job: combine(p(job) for p in parts))

    def _sequence(self) -> Predicate:
        parts = [self._factor()]
        while self._peek()[0] in ("text", "string", "NOT") or self._peek() == ("punct", "("):
            parts.append(self._factor())
        return parts[0] if len(parts) == 1 else (lambda job: all(p(job) for p in parts))

    def _factor(self) -> Predicate:
        return self._joined(self._term, "OR", any)

    def _term(self) -> Predicate:
        kind, value = self._peek()
        negate = kind == "NOT" or (kind == "text" and value.startswith("-"))
        if kind == "NOT" or (kind, value) == ("text", "-"):
            self.pos += 1
        elif negate:
            self.tokens[self.pos] = ("text", value[1:])
        test = self._simple()
        return (lambda job: not test(job)) if negate else test

    def _simple(self) -> Predicate:
        if self._peek() == ("punct", "("):
            self.pos += 1
            test = self._expression()
            if self._peek() != ("punct", ")"):
                raise invalid_argument(f'Invalid filter "{self.text}": missing ")"')
            self.pos += 1
            return test
        member = self._member()
        if self._peek()[0] != "op":
            raise invalid_argument(f'Invalid filter "{self.text}": "{".".join(member)}" needs a comparison '
                                   "(FIELD OP VALUE); global restrictions are not supported")
        op = self._take("op")
        return self._restriction(member, op, ".".join(self._member()))

    def _member(self) -> list[str]:
        kind, value = self._peek()
        if kind not in ("text", "string"):
            raise invalid_argument(f'Invalid filter "{self.text}": expected a field or value near '
                                   f'"{value or "the end"}"')
        parts = [value]
        self.pos += 1
        while self._peek() == ("punct", "."):
            self.pos += 1
            kind, value = self._peek()
            if kind not in ("text", "string"):
                raise invalid_argument(f'Invalid filter "{self.text}": expected a field after "."')
            parts.append(value)
            self.pos += 1
        return parts

    def _restriction(self, member: list[str], op: str, value: str) -> Predicate:
        text = f"{'.'.join(member)}{op}{value}"

        def refuse(what: str) -> Exception:
            return invalid_argument(f'Unsupported filter "{text}": {what}')

        name = member[0]
        if name == "labels" and len(member) == 2:
            key = member[1]
            if op == ":":
                return lambda job: (key in (job.get("labels") or {})) if value == "*" \
                    else (job.get("labels") or {}).get(key) == value
            if op not in ("=", "!="):
                raise refuse("labels compare with = and : only")
            return lambda job: ((job.get("labels") or {}).get(key) == value) == (op == "=")
        if len(member) != 1:
            raise refuse("ListCustomJobs filters on display_name, state, create_time and labels.KEY only")
        if name == "display_name":
            if op == ":":  # the documented wildcard, e.g. display_name:"my_job_*"
                pattern = re.compile("^" + ".*".join(re.escape(p) for p in value.split("*")) + "$")
                return lambda job: bool(pattern.match(job.get("displayName", "")))
            if op not in ("=", "!="):
                raise refuse("display_name compares with =, != and the : wildcard only")
            return lambda job: (job.get("displayName") == value) == (op == "=")
        if name == "state":
            if value not in self.states:
                raise invalid_argument(f'Invalid filter "{text}": {value!r} is not a JobState')
            if op not in ("=", "!="):
                raise refuse("state compares with = and != only")
            return lambda job: (job.get("state") == value) == (op == "=")
        if name == "create_time":
            if op == ":":
                raise refuse("create_time compares with =, !=, <, <=, > and >= only")
            try:
                wanted = parse_rfc3339(value)
            except ValueError:
                raise invalid_argument(f'Invalid filter "{text}": {value!r} is not an RFC 3339 timestamp') from None
            compare = _COMPARE[op]
            return lambda job: compare(parse_rfc3339(job["createTime"]), wanted)
        raise refuse("ListCustomJobs filters on display_name, state, create_time and labels.KEY only")


def job_filter(text: str, states: frozenset[str]) -> Predicate:
    """A predicate over CustomJob JSON (camelCase) for a ListCustomJobs ``filter``."""
    return _JobFilter(text, states).parse()


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
