"""Small Kubernetes API building blocks: timestamps, names, Status errors, selectors, quantities, patches."""

from __future__ import annotations

import copy
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

JSON = dict[str, Any]

# The alphabet Kubernetes uses for generated name suffixes (no vowels, no confusable characters).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(when: datetime | None = None) -> str:
    """RFC 3339 with second precision, as the API server writes metav1.Time."""
    return (when or utcnow()).strftime("%Y-%m-%dT%H:%M:%SZ")


def timestamp_nano(when: datetime) -> str:
    """RFC 3339 with nanoseconds, as kubelet prefixes log lines."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond:06d}000Z"


def parse_timestamp(value: str) -> datetime:
    """RFC 3339 (``Z`` or offset, any fraction digits) as an aware datetime; ApiError 400 if malformed."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip()).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, "BadRequest", f"invalid time {value!r}: expected RFC 3339")


def random_suffix(length: int = 5) -> str:
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(length))


def new_uid() -> str:
    return str(uuid.uuid4())


def deep(obj: Any) -> Any:
    return copy.deepcopy(obj)


class ApiError(Exception):
    """An error the API server reports as a ``Status`` object with an HTTP code."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> JSON:
        body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid(kind: str, group: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """422 Invalid, with one cause per (field, message) like the API server's field validation."""
    what = f"{kind}.{group}" if group else kind
    text = "; ".join(f"{field}: {msg}" for field, msg in causes)
    details = {"name": name, "group": group, "kind": kind,
               "causes": [{"reason": "FieldValueInvalid", "message": msg, "field": field} for field, msg in causes]}
    return ApiError(422, "Invalid", f'{what} "{name}" is invalid: {text}', details)


# ----- label and field selectors -------------------------------------------------------------------

Matcher = Callable[[Mapping[str, str]], bool]

_SET_RE = re.compile(r"^(\S+)\s+(in|notin)\s+\((.*)\)$")


def _split_requirements(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def _requirement(text: str) -> Matcher:
    if text.startswith("!"):
        key = text[1:].strip()
        return lambda labels: key not in labels
    match = _SET_RE.match(text)
    if match:
        key, op, raw = match.groups()
        values = {value.strip() for value in raw.split(",")}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    for op in ("!=", "==", "="):
        if op in text:
            key, value = (part.strip() for part in text.split(op, 1))
            if not key or any(c in value for c in "=!() "):
                break
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    else:
        if re.fullmatch(r"[A-Za-z0-9._/-]+", text):
            return lambda labels: text in labels
    raise bad_request(f"unable to parse requirement: {text!r}")


def label_matcher(selector: str | None) -> Matcher:
    """Compile a label selector (``a=b,c!=d,e in (f,g),!h``) into a predicate over a labels map."""
    requirements = [_requirement(part) for part in _split_requirements(selector or "")]
    return lambda labels: all(req(labels) for req in requirements)


def selector_from_match(selector: JSON | None) -> Matcher:
    """A ``LabelSelector`` object (matchLabels / matchExpressions) as a predicate."""
    selector = selector or {}
    reqs: list[Matcher] = [_requirement(f"{k}={v}") for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        reqs.append(_expression(key, op, values))
    return lambda labels: all(req(labels) for req in reqs)


def _expression(key: str, op: str, values: list[str]) -> Matcher:
    if op == "In":
        return lambda labels: labels.get(key) in values
    if op == "NotIn":
        return lambda labels: labels.get(key) not in values
    if op == "Exists":
        return lambda labels: key in labels
    if op == "DoesNotExist":
        return lambda labels: key not in labels
    if op in ("Gt", "Lt"):
        def compare(labels: Mapping[str, str]) -> bool:
            try:
                have, want = int(labels[key]), int(values[0])
            except (KeyError, ValueError, IndexError):
                return False
            return have > want if op == "Gt" else have < want
        return compare
    raise bad_request(f"unsupported operator {op!r}")


def node_selector_term_matcher(term: JSON) -> Matcher:
    reqs = [_expression(e["key"], e["operator"], e.get("values") or []) for e in term.get("matchExpressions") or []]
    return lambda labels: all(req(labels) for req in reqs)


def field_value(obj: JSON, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def field_matcher(selector: str | None, allowed: frozenset[str]) -> Callable[[JSON], bool]:
    """Compile a field selector; like the API server, only the fields the resource indexes are allowed."""
    checks: list[Callable[[JSON], bool]] = []
    for part in _split_requirements(selector or ""):
        for op in ("!=", "==", "="):
            if op in part:
                field, value = (p.strip() for p in part.split(op, 1))
                break
        else:
            raise bad_request(f"invalid field selector: {part!r}")
        if field not in allowed:
            raise bad_request(f'field label not supported: {field}')
        checks.append(_field_check(field, value, negate=op == "!="))
    return lambda obj: all(check(obj) for check in checks)


def _field_check(field: str, value: str, *, negate: bool) -> Callable[[JSON], bool]:
    return lambda obj: (field_value(obj, field) == value) != negate


# ----- names and labels ------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def check_dns_subdomain(value: str, limit: int = 253) -> str | None:
    if len(value) > limit:
        return f"must be no more than {limit} characters"
    if not _DNS_SUBDOMAIN.match(value):
        return ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                "and must start and end with an alphanumeric character")
    return None


def check_dns_label(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS_LABEL.match(value):
        return ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
                "and must start and end with an alphanumeric character")
    return None


def check_labels(labels: Mapping[str, Any], field: str) -> list[tuple[str, str]]:
    causes = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and check_dns_subdomain(prefix)) or len(name) > 63 or not _LABEL_NAME.match(name):
            causes.append((f"{field}", f"Invalid value: {key!r}: name part must consist of alphanumeric characters, "
                                       "'-', '_' or '.', and must start and end with an alphanumeric character"))
        if not isinstance(value, str):
            causes.append((f"{field}[{key}]", "Invalid value: label values must be strings"))
        elif len(value) > 63:
            causes.append((f"{field}", f"Invalid value: {value!r}: must be no more than 63 characters"))
        elif not _LABEL_VALUE.match(value):
            causes.append((f"{field}", f"Invalid value: {value!r}: a valid label must be an empty string or consist "
                                       "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                                       "alphanumeric character"))
    return causes


# ----- quantities -----------------------------------------------------------------------------------

_SUFFIXES = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[a-zA-Z]*)$")


def parse_quantity(value: Any) -> Decimal:
    """A resource quantity (``500m``, ``32Gi``, ``1e3``) as a number; ValueError when malformed."""
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(text)
    number, suffix = match.groups()
    try:
        base = Decimal(number)
    except InvalidOperation:
        raise ValueError(text)
    if suffix[:1] in ("e", "E") and suffix[1:].lstrip("+-").isdigit():
        return base * Decimal(10) ** int(suffix[1:])
    if suffix not in _SUFFIXES:
        raise ValueError(text)
    return base * _SUFFIXES[suffix]


# ----- patches ---------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return deep(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """An approximation of strategic merge: a merge patch whose lists of named objects merge by name."""
    if not isinstance(patch, dict):
        return deep(patch)
    if patch.get("$patch") == "replace":
        return {k: deep(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list) and _named(value) and _named(result[key]):
            merged = {item["name"]: item for item in result[key]}
            for item in value:
                if item.get("$patch") == "delete":
                    merged.pop(item["name"], None)
                else:
                    merged[item["name"]] = strategic_merge_patch(merged.get(item["name"]), item)
            result[key] = list(merged.values())
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _named(items: list[Any]) -> bool:
    return all(isinstance(item, dict) and "name" in item for item in items)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: JSON, operations: list[JSON]) -> JSON:
    """RFC 6902 JSON patch (add, remove, replace, test, copy, move)."""
    doc = deep(target)

    def walk(path: list[str]) -> tuple[Any, str]:
        node: Any = doc
        for part in path[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, path[-1]

    def get(path: str) -> Any:
        node, key = walk(_pointer(path))
        return node[int(key)] if isinstance(node, list) else node[key]

    def put(path: str, value: Any, replace: bool) -> None:
        node, key = walk(_pointer(path))
        if isinstance(node, list):
            if key == "-":
                node.append(value)
            elif replace:
                node[int(key)] = value
            else:
                node.insert(int(key), value)
        else:
            node[key] = value

    def remove(path: str) -> Any:
        node, key = walk(_pointer(path))
        return node.pop(int(key)) if isinstance(node, list) else node.pop(key)

    try:
        for op in operations:
            kind, path = op["op"], op["path"]
            if kind == "add":
                put(path, deep(op["value"]), replace=False)
            elif kind == "replace":
                get(path)
                put(path, deep(op["value"]), replace=True)
            elif kind == "remove":
                remove(path)
            elif kind == "test":
                if get(path) != op["value"]:
                    raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                                   f"testing value {path} failed")
            elif kind in ("copy", "move"):
                value = remove(op["from"]) if kind == "move" else deep(get(op["from"]))
                put(path, value, replace=False)
            else:
                raise bad_request(f"unknown JSON patch operation {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {exc!r}")
    return doc
