"""The hub: one XSUB/XPUB proxy per micro-grid, so a service needs one address to join.

Publishers connect to the XSUB side, subscribers to the XPUB side; subscriptions flow
upstream so publishers only send what someone wants. The proxy runs in libzmq's own loop
(``zmq.proxy_steerable``) on a thread, steered to stop through an inproc PAIR.
"""

from __future__ import annotations

import logging
import threading
import uuid

import zmq

from .keys import Security

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, security: Security, *, pub_bind: str, sub_bind: str) -> None:
        self.security = security
        self.pub_bind, self.sub_bind = pub_bind, sub_bind
        self.ctx = zmq.Context()
        self._ctl = f"inproc://hub-ctl-{uuid.uuid4().hex}"
        self._thread: threading.Thread | None = None
        self.endpoints: tuple[str, str] = ("", "")

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
        return self.endpoints

    def _run(self, ctl: zmq.Socket) -> None:  # type: ignore[type-arg]
        try:
            zmq.proxy_steerable(self.xsub, self.xpub, None, ctl)
        except zmq.ZMQError as e:
            if e.errno != zmq.ETERM:
                log.error("hub proxy stopped: %s", e)
        finally:
            ctl.close(0)

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
        self.ctx.term()
