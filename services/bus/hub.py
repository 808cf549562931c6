"""The hub: one XSUB/XPUB proxy per micro-grid, so a service needs one address to join,
and the one place that checks who publishes what.

Publishers connect to the XSUB side, subscribers to the XPUB side; subscriptions flow
upstream unchanged so publishers only send what someone wants. Every published message
must be ``[topic, envelope]`` with the topic ``type.site``, and ``site`` (the part after
the last dot) must be the site whose CURVE key sent it (the frame's ZAP ``User-Id``, see
:mod:`.keys`). Anything else is dropped, counted by (cause, sending site) in
:attr:`Hub.drops` and logged by the one rule of :mod:`.retry` (the first per (cause, site),
then its 10th, 100th...):

- ``site``: the topic names another site than the sender's key;
- ``frames``: not exactly two frames;
- ``no_site``: a topic without ``.site``.

The hub reads no JSON: subscribers check that the envelope's ``source`` is the topic's
site (:func:`.envelope.decode`), so a message that passed here speaks for its sender only.

Without CURVE on the publishers' side (``GRIDTRADE_INSECURE``, or an ``ipc://`` bind)
there is no identity: the hub forwards everything and says so at ERROR level.

The proxy is a loop of its own on a thread (a sync :class:`zmq.Poller` over both sides
and an inproc PAIR that stops it), draining each side in batches without blocking.
``bench/bus.py`` measures what the check costs against libzmq's own proxy.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter

import zmq

from .keys import Security
from .retry import worth_logging

log = logging.getLogger(__name__)

BATCH = 4096
"""Messages forwarded per wake-up before looking at subscriptions and the stop signal."""


class Hub:
    def __init__(self, security: Security, *, pub_bind: str, sub_bind: str) -> None:
        self.security = security
        self.pub_bind, self.sub_bind = pub_bind, sub_bind
        self.ctx = zmq.Context()
        self._ctl = f"inproc://hub-ctl-{uuid.uuid4().hex}"
        self._thread: threading.Thread | None = None
        self.endpoints: tuple[str, str] = ("", "")
        self.checks = not security.insecure and pub_bind.startswith("tcp://")
        """False without CURVE on the publishers' side: no identity, everything is forwarded."""
        self.drops: Counter[tuple[str, str]] = Counter()
        """Dropped messages by (cause, sending site)."""
        self.forwarded = 0
        self._suffixes: dict[str | None, bytes] = {}

    def start(self) -> tuple[str, str]:
        """Bind both sides and start proxying; returns the bound (pub, sub) endpoints."""
        self.security.start(self.ctx)
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xpub = self.ctx.socket(zmq.XPUB)
        for sock, ep in ((self.xsub, self.pub_bind), (self.xpub, self.sub_bind)):
            sock.linger = 0
            sock.sndhwm = sock.rcvhwm = 200_000
            self.security.serve(sock, ep)
            sock.bind(ep)
        self.endpoints = (self.xsub.last_endpoint.decode(), self.xpub.last_endpoint.decode())
        ctl = self.ctx.socket(zmq.PAIR)
        ctl.bind(self._ctl)
        self._ctl_sock = self.ctx.socket(zmq.PAIR)
        self._ctl_sock.linger = 0
        self._ctl_sock.connect(self._ctl)
        self._thread = threading.Thread(target=self._run, args=(ctl,), name="hub-proxy", daemon=True)
        self._thread.start()
        log.info("hub: publishers -> %s, subscribers -> %s", *self.endpoints)
        if not self.checks:
            log.error("hub: NO IDENTITY: publishers connect without CURVE (%s), so the hub cannot tell who sends "
                      "a message and forwards everything: any peer can publish in any site's name.",
                      "GRIDTRADE_INSECURE=1" if self.security.insecure else self.pub_bind)
        return self.endpoints

    def _run(self, ctl: zmq.Socket) -> None:  # type: ignore[type-arg]
        try:
            self._loop(ctl)
        except zmq.ZMQError as e:
            if e.errno != zmq.ETERM:
                log.error("hub proxy stopped: %s", e)
        except Exception:  # noqa: BLE001 - a bug: say so loudly, the process health shows it
            log.exception("hub proxy failed")
        finally:
            ctl.close(0)

    def _loop(self, ctl: zmq.Socket) -> None:  # type: ignore[type-arg]
        xsub, xpub = self.xsub, self.xpub
        poller = zmq.Poller()
        poller.register(xsub, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        poller.register(ctl, zmq.POLLIN)
        poll = poller.poll
        forward = self._forward_checked if self.checks else self._forward_all
        while True:
            ready = dict(poll())
            if ready.get(xpub):
                self._subscriptions()
            if ready.get(xsub):
                self.forwarded += forward()
            if ready.get(ctl):
                return

    def _subscriptions(self) -> None:
        """XPUB -> XSUB: (un)subscriptions, unchanged."""
        recv, send = self.xpub.recv_multipart, self.xsub.send_multipart
        try:
            for _ in range(BATCH):
                send(recv(zmq.NOBLOCK))
        except zmq.Again:
            pass

    def _forward_all(self) -> int:
        recv, send = self.xsub.recv_multipart, self.xpub.send_multipart
        n = 0
        try:
            while n < BATCH:
                send(recv(zmq.NOBLOCK))  # small frames: copying is cheaper than pyzmq Frames
                n += 1
        except zmq.Again:
            pass
        return n

    def _forward_checked(self) -> int:
        """XSUB -> XPUB: only ``[type.site, envelope]`` sent with ``site``'s key.

        The topic is received as a frame (its ``User-Id`` names the sender), the envelope as
        plain bytes: for frames this small pyzmq's copying receive is cheaper than a Frame."""
        recv, send, rcvmore = self.xsub.recv, self.xpub.send, self.xsub.get
        NOBLOCK, SNDMORE, RCVMORE = zmq.NOBLOCK, zmq.SNDMORE, zmq.RCVMORE  # noqa: N806 - locals for the hot loop
        suffixes = self._suffixes
        n = 0
        try:
            for _ in range(BATCH):
                topic = recv(NOBLOCK, copy=False)
                if not topic.more:
                    self._drop("frames", topic)
                    continue
                env = recv()  # the parts of a message arrive together
                if rcvmore(RCVMORE):
                    self._drop("frames", topic)
                    while rcvmore(RCVMORE):
                        recv()
                    continue
                try:
                    site = topic.get("User-Id")
                except zmq.ZMQError:  # no User-Id (a key the ZAP handler gave no site)
                    site = None
                suffix = suffixes.get(site)
                if suffix is None:  # b".site"; no site, or a dotted name, never matches
                    suffix = suffixes[site] = f".{site}".encode() if site and "." not in site else b"\0"
                t = topic.bytes
                if not t.endswith(suffix):
                    self._drop("site" if t.rfind(b".") > 0 and not t.endswith(b".") else "no_site", topic)
                    continue
                send(t, SNDMORE)
                send(env)
                n += 1
        except zmq.Again:
            pass
        return n

    def drop_counts(self) -> dict[tuple[str, str], int]:
        """A copy of :attr:`drops`, safe to take from another thread than the proxy's."""
        return dict(self.drops)  # one C-level copy under the GIL: never sees the dict change size

    def _drop(self, cause: str, first: zmq.Frame) -> None:
        try:
            site = first.get("User-Id") or "?"
        except zmq.ZMQError:
            site = "?"
        key = (cause, site)
        self.drops[key] += 1
        if worth_logging(self.drops[key]):
            log.warning("hub: dropped a message from site %s (%s; topic %r); %d so far of this cause from this site "
                        "(only counted, logged again at the 10th, 100th...)", site, cause, first.bytes[:80],
                        self.drops[key])

    def stop(self) -> None:
        if self._thread is None:
            return
        self._ctl_sock.send(b"TERMINATE")
        self._thread.join(5)
        self._thread = None
        self._ctl_sock.close(0)
        self.xsub.close(0)
        self.xpub.close(0)
        self.security.stop()
        self.ctx.destroy(linger=0)
