"""CurveZMQ on every TCP socket, with an allow-list of public keys.

A site's keys folder holds its own key pair (``<site>.key``, ``<site>.key_secret``) and
``allowed/``: the public keys (``<site>.key``) of every site it trusts, itself included.
A client looks up the server's public key there by the server's site name. ``ipc://``
and ``inproc://`` endpoints are local to the machine and go without CURVE.

Identity: every public key belongs to one site (the file name in ``allowed/``). The ZAP
handler answers a connecting key with its site as the ZAP User-Id, so every message a
CURVE socket receives carries its sender's site in the frame's ``User-Id`` property
(:func:`peer_site`). Nothing a peer writes about itself decides who it is.

A key put on the allow-list while a process runs is taken without a restart: the ZAP
handler reads ``allowed/`` again when a key it does not know connects (at most once a
second). So a site joins a running market once its key is copied in, and on one host
(``docker compose up`` of every profile) a service that started before another site's
``keys`` run had written that site's key accepts it once it is there.
"""

from __future__ import annotations

import copy
import logging
import pathlib
import shutil
import time

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.thread import ThreadAuthenticator

from .errors import BusError

log = logging.getLogger(__name__)


def ensure_keys(keys_dir: pathlib.Path, site: str) -> pathlib.Path:
    """Create ``site``'s key pair if missing and allow it; return the secret key file."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    allowed = keys_dir / "allowed"
    allowed.mkdir(exist_ok=True)
    secret = keys_dir / f"{site}.key_secret"
    if not secret.exists():
        zmq.auth.create_certificates(keys_dir, site)
        secret.chmod(0o600)
        log.info("created CURVE key pair for site %s in %s", site, keys_dir)
    public = keys_dir / f"{site}.key"
    if not (allowed / public.name).exists():
        shutil.copy(public, allowed / public.name)
    return secret


def key_sites(allowed: pathlib.Path) -> dict[bytes, str]:
    """Public key (z85) -> the site it belongs to, from ``allowed/<site>.key``."""
    out: dict[bytes, str] = {}
    for path in sorted(allowed.glob("*.key")):
        try:
            public = zmq.auth.load_certificate(path)[0]
        except (OSError, ValueError):
            log.warning("unreadable public key %s: ignored", path)
            continue
        if public in out and out[public] != path.stem:
            raise BusError(f"the public key in {path.name} also belongs to site {out[public]!r}: "
                           "a key belongs to one site")
        out[public] = path.stem
    return out


def peer_site(frame: zmq.Frame) -> str | None:
    """The site whose key sent this frame (None on a socket without CURVE)."""
    try:
        site = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return site or None


class _SiteNames:
    """Mixin for pyzmq's authenticators: the allow-list folder is the CURVE credentials
    provider (:meth:`callback`), and the ZAP User-Id of a client is its site."""

    RELOAD_EVERY_S = 1.0  # an unknown key reads allowed/ again at most this often

    allowed: pathlib.Path
    sites: dict[bytes, str]
    read_at: float

    def load(self, allowed: pathlib.Path) -> None:
        self.allowed = allowed
        self.sites = key_sites(allowed)
        self.read_at = time.monotonic()

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Is this z85 public key on the allow-list? An unknown one has the folder read again."""
        if client_key not in self.sites and time.monotonic() - self.read_at >= self.RELOAD_EVERY_S:
            self.read_at = time.monotonic()
            try:
                sites = key_sites(self.allowed)
            except (BusError, OSError) as e:  # a bad change to the folder: keep what was read before
                log.error("the allow-list %s was not read again: %s", self.allowed, e)
            else:
                for key in sites.keys() - self.sites.keys():
                    log.info("allow-list: the key of site %s was added", sites[key])
                self.sites = sites
        return client_key in self.sites

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.sites.get(z85.encode(client_public_key), "")


class _AsyncioSiteAuthenticator(_SiteNames, AsyncioAuthenticator):
    pass


class _ThreadSiteAuthenticator(_SiteNames, ThreadAuthenticator):
    pass


def _tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


class Security:
    """Applies CURVE (or, only when ``insecure``, nothing) to the sockets of one process."""

    def __init__(self, keys_dir: pathlib.Path, site: str, *, insecure: bool = False) -> None:
        self.keys_dir = keys_dir
        self.site = site
        self.insecure = insecure
        self._auth: AsyncioAuthenticator | ThreadAuthenticator | None = None
        if insecure:
            log.error("INSECURE: CURVE is OFF (GRIDTRADE_INSECURE=1). There is no identity on the bus: anyone "
                      "who reaches the TCP ports can read every event, publish in any site's name, mint, settle "
                      "and act for any account. Never run a real micro-grid like this.")
            self.public = self.secret = b""
            return
        secret_file = keys_dir / f"{site}.key_secret"
        if not secret_file.exists():
            raise BusError(f"no CURVE key for site {site!r} in {keys_dir}: run `gridtrade keys --site {site}`")
        public, secret = zmq.auth.load_certificate(secret_file)
        assert secret is not None
        self.public, self.secret = public, secret

    def for_context(self) -> Security:
        """The same keys for another zmq context (which needs a ZAP handler of its own),
        without repeating the insecure warning."""
        other = copy.copy(self)
        other._auth = None
        return other

    def server_key(self, site: str) -> bytes:
        path = self.keys_dir / "allowed" / f"{site}.key"
        if not path.exists():
            raise BusError(f"no public key for site {site!r} in {path.parent} (not on the allow-list)")
        return zmq.auth.load_certificate(path)[0]

    def start(self, ctx: zmq.Context) -> None:  # type: ignore[type-arg]
        """Start the ZAP handler that checks clients against ``allowed/`` (once per context)."""
        if self.insecure or self._auth is not None:
            return
        import zmq.asyncio

        auth_cls = _AsyncioSiteAuthenticator if isinstance(ctx, zmq.asyncio.Context) else _ThreadSiteAuthenticator
        auth = auth_cls(ctx)
        auth.load(self.keys_dir / "allowed")
        auth.start()
        auth.configure_curve_callback(domain="gridtrade", credentials_provider=auth)
        self._auth = auth

    def sites(self) -> dict[bytes, str]:
        """Public key (z85) -> site, for every key on the allow-list."""
        return key_sites(self.keys_dir / "allowed")

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def serve(self, sock: zmq.Socket, endpoint: str) -> None:  # type: ignore[type-arg]
        """Make ``sock`` a CURVE server if it binds a TCP endpoint."""
        if self.insecure or not _tcp(endpoint):
            return
        if self._auth is None:
            raise BusError("Security.start(ctx) must run before serving")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = b"gridtrade"

    def connect_to(self, sock: zmq.Socket, endpoint: str, server_site: str) -> None:  # type: ignore[type-arg]
        """Make ``sock`` a CURVE client of ``server_site`` if it connects over TCP."""
        if self.insecure or not _tcp(endpoint):
            return
        sock.curve_serverkey = self.server_key(server_site)
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
