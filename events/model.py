"""Event types: frozen dataclasses registered with a schema version and a family.

An event type is a frozen dataclass named in the past tense, registered with `event_type`:

    @event_type(version="1.0", family="shards")
    @dataclass(frozen=True, slots=True)
    class ShardLoaded:
        model_id: str
        fragment: str
        memory_bytes: int

The registered name (the class name unless given) is the `type` field on the wire. Field
annotations are limited to what JSON carries without floats: `int`, `str`, `bool`,
`tuple[T, ...]` (a JSON array), `dict[str, T]` (a JSON object), unions of these, and
`T | None`. A field with a default is optional on the wire. `__post_init__` may raise
ValueError for semantic checks (a bad fragment spec), which rejects the event as malformed.
A check that needs the envelope goes in a method `check_envelope(self, author, seq)`, which
raises ValueError too; the codec calls it when signing and when decoding.

Versions are `MAJOR.MINOR` per type. Every type's major is `SCHEMA_MAJOR`: a change that an
older node cannot read is a new major for the whole swarm. A newer minor of a type may add
optional fields, which an older node ignores. At a version the node has registered, unknown
fields are rejected. The family groups types for views (`membership`, `shards`, ...): a view
handles every type of the families it projects and passes over the rest.

Each type also has a scope: where its events travel and which sequence numbers
they take (docs/events.md, "Scopes"):

- `swarm` (the default): gossiped to every node; the author numbers them 1, 2, 3, ... in
  its swarm sequence, which heartbeats announce and anti-entropy fills gaps in;
- `request`: request-scoped records that travel point to point with their tensors and stay
  in the logs of the nodes on the request's route. The author numbers them in a separate
  request sequence, so they leave no gaps in its swarm sequence and anti-entropy never
  offers them.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from events.errors import SchemaError

SCHEMA_MAJOR = 1
SWARM_SCOPE = "swarm"
REQUEST_SCOPE = "request"
SCOPES = (SWARM_SCOPE, REQUEST_SCOPE)

_VERSION_PATTERN = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")
_TYPE_NAME_PATTERN = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")
_FAMILY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")

Converter = Callable[[Any], Any]
T = TypeVar("T")


class SchemaViolation(ValueError):
    """A JSON value does not fit a field's declared type."""


@dataclass(frozen=True, slots=True)
class UnknownBody:
    """The body of an event whose type this node does not know (a newer minor version).

    The event is stored and relayed, and reducers pass over it.
    """

    type: str
    version: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    convert: Converter
    required: bool


class EventType:
    """A registered event type: its class, name, version, family and field converters."""

    __slots__ = ("cls", "name", "major", "minor", "version", "family", "scope", "check_envelope", "_fields", "_names")

    def __init__(self, cls: type, name: str, version: str, family: str, scope: str = SWARM_SCOPE) -> None:
        self.cls = cls
        self.name = name
        self.major, self.minor = parse_version(version)
        self.version = version
        self.family = family
        self.scope = scope
        self.check_envelope: Callable[[Any, str, int], None] | None = getattr(cls, "check_envelope", None)
        hints = typing.get_type_hints(cls)
        self._fields = tuple(
            _Field(
                field.name,
                _converter_for(hints[field.name], f"{name}.{field.name}"),
                field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING,
            )
            for field in dataclasses.fields(cls)
        )
        self._names = frozenset(field.name for field in self._fields)

    def __repr__(self) -> str:
        return f"EventType({self.name} {self.version}, family={self.family})"

    @property
    def field_names(self) -> frozenset[str]:
        return self._names

    def body_to_json(self, body: Any) -> dict[str, Any]:
        """Return the body's fields as a JSON-ready dict; raise SchemaViolation on a bad value."""
        return {field.name: field.convert(getattr(body, field.name)) for field in self._fields}

    def body_from_json(self, fields: dict[str, Any], allow_unknown: bool) -> Any:
        """Build the body from decoded JSON.

        Raises SchemaViolation for a missing or mistyped field, and UnknownFieldError for a
        field this version does not define unless `allow_unknown` (a newer minor) is set.
        """
        values: dict[str, Any] = {}
        for field in self._fields:
            if field.name in fields:
                values[field.name] = field.convert(fields[field.name])
            elif field.required:
                raise SchemaViolation(f"{self.name} body is missing the required field {field.name!r}")
        if len(values) != len(fields):
            unknown = sorted(fields.keys() - self._names)
            if not allow_unknown:
                raise UnknownFieldError(
                    f"{self.name} {self.version} has no field(s) {unknown}; "
                    f"known fields are {sorted(self._names)}"
                )
            for name in unknown:
                reject_floats(fields[name], f"{self.name}.{name}")
        try:
            return self.cls(**values)
        except (TypeError, ValueError) as error:
            raise SchemaViolation(f"invalid {self.name} body: {error}") from None


class UnknownFieldError(SchemaViolation):
    """A body names a field that its type's version does not define."""


_TYPES_BY_NAME: dict[str, EventType] = {}
_TYPES_BY_CLASS: dict[type, EventType] = {}


def event_type(
    *, version: str, family: str, name: str | None = None, scope: str = SWARM_SCOPE
) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as an event type (a class decorator).

    `version` is `MAJOR.MINOR` with MAJOR equal to SCHEMA_MAJOR. `scope` is `swarm` or
    `request` (see the module docstring). Registering a second class under a name already
    taken raises SchemaError.
    """
    if scope not in SCOPES:
        raise SchemaError(f"event scope {scope!r} is not one of {list(SCOPES)}")

    def register(cls: type[T]) -> type[T]:
        type_name = name or cls.__name__
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise SchemaError(f"event type {type_name} must be a frozen dataclass (@dataclass(frozen=True))")
        if not _TYPE_NAME_PATTERN.fullmatch(type_name):
            raise SchemaError(f"event type name {type_name!r} must match {_TYPE_NAME_PATTERN.pattern}")
        if not _FAMILY_PATTERN.fullmatch(family):
            raise SchemaError(f"event family {family!r} must match {_FAMILY_PATTERN.pattern}")
        registered = EventType(cls, type_name, version, family, scope)
        if registered.major != SCHEMA_MAJOR:
            raise SchemaError(
                f"event type {type_name} has version {version}, but this build's schema major is {SCHEMA_MAJOR}"
            )
        existing = _TYPES_BY_NAME.get(type_name)
        if existing is not None and existing.cls is not cls:
            raise SchemaError(f"event type name {type_name!r} is already registered by {existing.cls!r}")
        _TYPES_BY_NAME[type_name] = registered
        _TYPES_BY_CLASS[cls] = registered
        return cls

    return register


def type_by_name(name: str) -> EventType | None:
    """Return the registered type with this wire name, or None if this node does not know it."""
    return _TYPES_BY_NAME.get(name)


def scope_of(type_name: str) -> str:
    """Return the scope of the events of this wire type; a type this node does not know is swarm-scoped."""
    registered = _TYPES_BY_NAME.get(type_name)
    return SWARM_SCOPE if registered is None else registered.scope


def skipped_after_equivocation(type_name: str, seq: int, disputed_seq: int | None) -> bool:
    """Return whether views skip an event of an author caught equivocating at `disputed_seq`.

    Swarm-scoped events are skipped from the disputed seq on. Request-scoped records number in
    a sequence of their own that cannot be compared with the disputed seq, so every record of
    such an author is skipped, and the views stay the same in any delivery order.
    """
    if disputed_seq is None:
        return False
    return scope_of(type_name) == REQUEST_SCOPE or seq >= disputed_seq


def type_of(body: Any) -> EventType:
    """Return the registered type of an event body; raise SchemaError if it is not registered."""
    registered = _TYPES_BY_CLASS.get(type(body))
    if registered is None:
        raise SchemaError(f"{type(body).__name__} is not a registered event type; decorate it with @event_type")
    return registered


def registered_type_of_class(cls: type) -> EventType | None:
    """Return the registered type of a body class, or None if it is not registered."""
    return _TYPES_BY_CLASS.get(cls)


def registered_types(family: str | None = None) -> list[EventType]:
    """Return the registered types, optionally of one family, sorted by name."""
    return sorted(
        (registered for registered in _TYPES_BY_NAME.values() if family is None or registered.family == family),
        key=lambda registered: registered.name,
    )


def parse_version(version: str) -> tuple[int, int]:
    """Split `MAJOR.MINOR` into two ints; raise SchemaError on any other form."""
    match = _VERSION_PATTERN.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise SchemaError(f"schema version {version!r} is not of the form MAJOR.MINOR (such as '1.0')")
    return int(match.group(1)), int(match.group(2))


def is_valid_type_name(name: str) -> bool:
    """Return whether `name` may name an event type on the wire."""
    return _TYPE_NAME_PATTERN.fullmatch(name) is not None


def reject_floats(value: Any, where: str) -> None:
    """Raise SchemaViolation if a float occurs anywhere in a decoded JSON value."""
    if isinstance(value, float):
        raise SchemaViolation(f"{where} is the float {value!r}; event payloads carry no floats (use integers)")
    if isinstance(value, list):
        for item in value:
            reject_floats(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_floats(item, f"{where}.{key}")


def _converter_for(annotation: Any, where: str) -> Converter:
    """Compile a converter that checks a JSON value against a field annotation."""
    if annotation is int:
        return _exact(int, where)
    if annotation is str:
        return _exact(str, where)
    if annotation is bool:
        return _exact(bool, where)
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is tuple and len(arguments) == 2 and arguments[1] is Ellipsis:
        return _tuple_converter(_converter_for(arguments[0], f"{where}[]"), where)
    if origin is dict and arguments and arguments[0] is str:
        return _dict_converter(_converter_for(arguments[1], f"{where}{{}}"), where)
    if origin in (typing.Union, types.UnionType):
        return _union_converter([_converter_for(argument, where) for argument in arguments], where)
    if annotation is type(None):
        return _exact(type(None), where)
    raise SchemaError(
        f"{where} has type {annotation!r}; event fields may be int, str, bool, tuple[T, ...], "
        "dict[str, T], unions of these, or T | None"
    )


def _exact(expected: type, where: str) -> Converter:
    def convert(value: Any) -> Any:
        # type() instead of isinstance(), so True is not an int.
        if type(value) is not expected:
            raise SchemaViolation(f"{where} must be {expected.__name__}, got {type(value).__name__} {value!r:.80}")
        return value

    return convert


def _tuple_converter(item: Converter, where: str) -> Converter:
    def convert(value: Any) -> Any:
        if type(value) is not list and type(value) is not tuple:
            raise SchemaViolation(f"{where} must be an array, got {type(value).__name__}")
        return tuple([item(element) for element in value])

    return convert


def _dict_converter(item: Converter, where: str) -> Converter:
    def convert(value: Any) -> Any:
        if type(value) is not dict:
            raise SchemaViolation(f"{where} must be an object, got {type(value).__name__}")
        for key in value:
            if type(key) is not str:
                raise SchemaViolation(f"{where} keys must be strings, got {key!r}")
        return {key: item(element) for key, element in value.items()}

    return convert


def _union_converter(options: list[Converter], where: str) -> Converter:
    def convert(value: Any) -> Any:
        for option in options:
            try:
                return option(value)
            except SchemaViolation:
                continue
        raise SchemaViolation(f"{where} has the value {value!r:.80}, which fits none of its types")

    return convert
