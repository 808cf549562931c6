"""The wire: ``[topic, envelope]`` frames, encoded and decoded through one TypeAdapter.

The envelope is JSON: ``v`` (the protocol's major version, separate from the package's),
``type``, ``id``, ``source`` (``site/service``), ``seq`` (strictly increasing per topic
of a source, surviving restarts), ``ts``, ``body`` and ``cause``: the id of the event or
command that led to this event (None for events nobody caused, such as a meter reading
from a timer), so one trade can be followed from a reading to a payment. The topic is
``type.site`` so subscribers filter by prefix.

Version 2 added ``cause``; version 1 envelopes (without it) still decode. A version 1
decoder refuses version 2 envelopes as a newer major (drop cause ``version``).

``cause`` is set without anyone passing it around: :data:`current_cause` is the id of the
event a subscriber is applying or the command a request handler is executing, and the
publisher stamps it on whatever is published meanwhile (see :func:`caused_by` for work
done later, e.g. a job recorded from an event).
"""

from __future__ import annotations

import contextvars
import json
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator

from .errors import DecodeError
from .events import EVENTS, Message

PROTOCOL_MAJOR = 2

current_cause: contextvars.ContextVar[str | None] = contextvars.ContextVar("gridtrade_cause", default=None)
"""The id of the event or command whose handling is running in this context."""


class caused_by:  # noqa: N801 - used like a function: ``with caused_by(event_id): ...``
    """Events published inside the block carry ``cause`` (unless given one explicitly).
    A plain and an async context manager, so it can join ``async with store.atomic()``."""

    def __init__(self, cause: str | None) -> None:
        self.cause = cause or None
        self._tokens: list[contextvars.Token[str | None]] = []

    def __enter__(self) -> None:
        self._tokens.append(current_cause.set(self.cause))

    def __exit__(self, *exc: object) -> None:
        current_cause.reset(self._tokens.pop())

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()


class Envelope(BaseModel):
    """One event with its metadata. ``body`` is the typed event."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = PROTOCOL_MAJOR
    type: str
    id: str = Field(min_length=1, max_length=64)
    source: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}/[a-z0-9][a-z0-9_.-]{0,62}$")
    seq: int = Field(ge=1)
    ts: float
    body: Message
    cause: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("v")
    @classmethod
    def _known_major(cls, v: int) -> int:
        if v > PROTOCOL_MAJOR:
            raise ValueError(f"newer major version {v} (this decoder speaks {PROTOCOL_MAJOR})")
        if v < 1:
            raise ValueError(f"unknown version {v}")
        return v

    @property
    def site(self) -> str:
        return self.source.split("/", 1)[0]

    @property
    def topic(self) -> str:
        return topic_of(self.type, self.site)


def topic_of(type_: str, site: str) -> str:
    return f"{type_}.{site}"


def tagged_union(base: type[BaseModel], bodies: dict[str, type[Message]]) -> tuple[TypeAdapter[Any], dict[str, Any]]:
    """One envelope class per body type (``type`` a Literal, ``body`` the model) and the
    discriminated-union adapter over them: the one place a wire union is built."""
    classes = {
        name: create_model(  # type: ignore[call-overload]
            f"{cls.__name__}{base.__name__}", __base__=base,
            type=(Literal[name], ...), body=(cls, ...),  # type: ignore[valid-type]
        )
        for name, cls in bodies.items()
    }
    union = Annotated[Union[tuple(classes.values())], Field(discriminator="type")]  # type: ignore[valid-type]
    return TypeAdapter(union), classes


ENVELOPE, _BY_TYPE = tagged_union(Envelope, EVENTS)
"""The one adapter every subscriber decodes through."""


def make(body: Message, *, source: str, seq: int, ts: float | None = None, id: str | None = None,
         cause: str | None = None) -> Envelope:
    """Wrap an event body in its envelope."""
    cls = _BY_TYPE[body.TYPE]
    return cls(type=body.TYPE, id=id or uuid.uuid4().hex, source=source, seq=seq,
               ts=time.time() if ts is None else ts, body=body, cause=cause or None)


def encode(env: Envelope) -> list[bytes]:
    return [env.topic.encode(), env.model_dump_json().encode()]


def cause_of(err: ValidationError) -> str:
    for e in err.errors():
        if e["type"] == "json_invalid" or e["type"] == "json_type" or e["type"] == "model_type" and not e["loc"]:
            return "garbage"
        if e["type"] in ("union_tag_invalid",):
            return "unknown_type"
        if e["type"] == "union_tag_not_found":
            return "invalid"
        if e["loc"] and e["loc"][-1] == "v" and "newer major" in e["msg"]:
            return "version"
    return "invalid"


def decode_json(data: bytes | str) -> Envelope:
    """Decode an envelope, or raise :class:`DecodeError` with a countable cause.

    Within a major version a newer publisher may add optional body fields: a body whose
    only fault is fields this decoder does not know is decoded without them (the models
    stay strict for what this side builds and for ``gridtrade bus publish``).
    """
    try:
        return ENVELOPE.validate_json(data)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False)
        unknown = [e["loc"] for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 3
                   and e["loc"][1] == "body"]
        if unknown and len(unknown) == len(errors):
            raw = json.loads(data)
            for _, _, field in unknown:
                raw["body"].pop(field, None)
            try:
                return ENVELOPE.validate_python(raw)
            except ValidationError:
                pass
        raise DecodeError(cause_of(err), str(errors[:2])) from None


SHARED_TYPES = (b"bus.heartbeat.",)
"""Topics (``type.site``) of types every subscriber receives from every source (a heartbeat a second each): decoded
once per process, however many subscribers it runs (a simulation's site host runs a few
hundred), instead of once per subscriber."""
SHARED_KEEP = 4096
_shared: dict[tuple[bytes, bytes], Envelope] = {}


def decode(frames: list[bytes]) -> Envelope:
    """Decode ``[topic, envelope]``; the topic must be the envelope's own. The same frames
    of a :data:`SHARED_TYPES` topic give the same envelope (frozen, read only) in this
    process; a frame that does not decode is never kept."""
    if len(frames) == 2 and frames[0].startswith(SHARED_TYPES):
        key = (bytes(frames[0]), bytes(frames[1]))  # the topic too: it is checked against the envelope
        env = _shared.get(key)
        if env is None:
            env = _decode(frames)
            if len(_shared) >= SHARED_KEEP:
                del _shared[next(iter(_shared))]  # the oldest: dicts keep insertion order
            _shared[key] = env
        return env
    return _decode(frames)


def _decode(frames: list[bytes]) -> Envelope:
    if len(frames) != 2:
        raise DecodeError("frames", f"expected 2 frames, got {len(frames)}")
    env = decode_json(frames[1])
    if frames[0] != env.topic.encode():
        raise DecodeError("topic", f"topic {frames[0][:80]!r} does not match {env.topic!r}")
    return env


def parse_body(type_: str, body: Any) -> Message:
    """Validate a body given as JSON text or a dict for ``type_`` (``gridtrade bus publish``)."""
    cls = EVENTS.get(type_)
    if cls is None:
        raise DecodeError("unknown_type", f"no event type {type_!r}; known: {', '.join(sorted(EVENTS))}")
    try:
        if isinstance(body, (str, bytes)):
            return cls.model_validate_json(body)
        return cls.model_validate(body)
    except ValidationError as err:
        raise DecodeError("invalid", str(err.errors(include_url=False))) from None
