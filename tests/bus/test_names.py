"""Each event class is named for its wire type, and no command or reply shares a name with
an event."""

from __future__ import annotations

from services.bus import commands as cmd
from services.bus import events as ev


def _camel(words: str) -> str:
    return "".join(w.capitalize() for w in words.split("_"))


def _classes(module: object, base: type) -> dict[str, type]:
    return {name: c for name, c in vars(module).items()
            if isinstance(c, type) and issubclass(c, base) and c.__module__ == module.__name__}  # type: ignore[attr-defined]


def test_each_event_class_is_named_for_its_type() -> None:
    events = {name: c for name, c in _classes(ev, ev.Message).items() if "TYPE" in c.__dict__}
    assert len(events) > 20
    for name, c in events.items():
        domain, what = c.TYPE.split(".", 1)
        # "meter.relay" is MeterRelay, "trade.agreed" TradeAgreed or "chain.settled" Settled
        assert name in (_camel(what), _camel(f"{domain}_{what}")), (name, c.TYPE)


def test_no_command_or_reply_is_named_like_an_event() -> None:
    events = set(_classes(ev, ev.Message))
    replies = set(_classes(cmd, cmd.Reply)) | set(_classes(cmd, cmd.Request))
    assert events & replies == set()
