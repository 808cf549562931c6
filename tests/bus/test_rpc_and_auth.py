"""Request/reply and CURVE on real sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import zmq
import zmq.asyncio
import zmq.auth

from services.bus import Caller, RequestError, RequestTimeout, RpcClient, RpcServer, Security, Store
from services.bus.commands import CancelOffer, Ok, Ping, Pong, ReplyEnvelope, wrap

from tests.support.bus import Applied, Grid, raw_socket, reading
from tests.support.poll import until

ADDR = "0x" + "ab" * 20


def market_server(grid: Grid, actx: zmq.asyncio.Context, tmp_path, cancels: str = "",  # type: ignore[no-untyped-def]
                  **kw: Any) -> tuple[Security, Store, RpcServer]:
    """The market's RPC server on a random loopback port (its key started, not yet serving),
    with a store of its own; ``cancels``: the columns of a ``cancels`` table to create in it."""
    sec = grid.security("market")
    sec.start(actx)
    store = Store(tmp_path / "srv.sqlite")
    if cancels:
        store.conn.execute(f"CREATE TABLE cancels ({cancels})")
    return sec, store, RpcServer(actx, sec, store, bind="tcp://127.0.0.1:*", **kw)


@pytest.fixture
async def server(grid: Grid, actx: zmq.asyncio.Context, tmp_path):  # type: ignore[no-untyped-def]
    sec, store, srv = market_server(grid, actx, tmp_path, "offer TEXT")

    async def cancel(req: CancelOffer, caller: Caller) -> Ok:
        if req.offer_id == "bad":
            raise RequestError("not_found", "no offer 'bad'")
        store.conn.execute("INSERT INTO cancels VALUES (?)", (req.offer_id,))
        if req.offer_id == "boom":
            raise RequestError("closed", "changed my mind")  # rolls back the insert above
        await asyncio.sleep(0.05)
        return Ok()

    async def ping(req: Ping, caller: Caller) -> Pong:
        return Pong(node="market/test", uptime_s=1.0)

    srv.handle(CancelOffer, cancel)
    srv.handle(Ping, ping)
    await srv.start()
    yield srv, store
    await srv.stop()
    sec.stop()


def cancels(store: Store) -> list[str]:
    return [r[0] for r in store.conn.execute("SELECT offer FROM cancels")]


async def test_request_reply_typed(server, grid: Grid, actx) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    client = RpcClient(actx, grid.security("home-7"), srv.endpoint)
    pong = await client.request(Ping())
    assert isinstance(pong, Pong) and pong.node == "market/test"
    await client.close()


async def test_a_retried_command_executes_once(server, grid: Grid, actx) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    client = RpcClient(actx, grid.security("home-7"), srv.endpoint)
    req = CancelOffer(offer_id="o-1", seller=ADDR)
    first, again, concurrent = await asyncio.gather(
        client.request(req, cmd_id="cmd-1"), client.request(req, cmd_id="cmd-1"), client.request(req, cmd_id="cmd-1"))
    assert first == again == concurrent == Ok()
    assert await client.request(req, cmd_id="cmd-1") == Ok()
    assert cancels(store) == ["o-1"]
    await client.request(req, cmd_id="cmd-2")  # a new command id is a new command
    assert cancels(store) == ["o-1", "o-1"]
    await client.close()


async def test_errors_are_clear_and_change_nothing(server, grid: Grid, actx) -> None:  # type: ignore[no-untyped-def]
    srv, store = server
    client = RpcClient(actx, grid.security("home-7"), srv.endpoint)
    with pytest.raises(RequestError) as e:
        await client.request(CancelOffer(offer_id="bad", seller=ADDR))
    assert e.value.code == "not_found" and "bad" in e.value.message
    with pytest.raises(RequestError) as e:
        await client.request(CancelOffer(offer_id="boom", seller=ADDR))
    assert e.value.code == "closed"
    assert cancels(store) == []
    raw = raw_socket(actx, grid, "home-7", zmq.DEALER, srv.endpoint)
    for junk in (b"not json", b'{"v":1,"type":"auction.cancel","cmd_id":"x","body":{"offer_id":"o"}}',
                 b'{"v":1,"type":"nope","cmd_id":"y","body":{}}', b'{"v":7,"type":"ping","cmd_id":"z","body":{}}'):
        await raw.send(junk)
        rep = ReplyEnvelope.model_validate_json(await asyncio.wait_for(raw.recv(), 10))
        assert not rep.ok and rep.error is not None and rep.error.code == "bad_request"
    raw.close(0)
    assert await client.request(Ping())  # still serving
    assert cancels(store) == []
    await client.close()


async def test_timeout_then_retry_with_the_same_id_executes_once(grid: Grid, actx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec, store, srv = market_server(grid, actx, tmp_path, "offer TEXT")
    gate = asyncio.Event()

    async def slow_cancel(req: CancelOffer, caller: Caller) -> Ok:
        store.conn.execute("INSERT INTO cancels VALUES (?)", (req.offer_id,))
        await gate.wait()
        return Ok()

    srv.handle(CancelOffer, slow_cancel)
    await srv.start()
    client = RpcClient(actx, grid.security("home-7"), srv.endpoint)
    with pytest.raises(RequestTimeout):
        await client.request(CancelOffer(offer_id="o-9", seller=ADDR), cmd_id="slow", timeout=0.3)
    gate.set()
    assert await client.request(CancelOffer(offer_id="o-9", seller=ADDR), cmd_id="slow", timeout=10) == Ok()
    assert cancels(store) == ["o-9"]
    await client.close()
    await srv.stop()
    sec.stop()


async def test_a_retry_goes_on_a_new_connection(grid: Grid, actx) -> None:  # type: ignore[no-untyped-def]
    """A reply is sent back on the connection its request came in on; when that connection
    is broken and made again (under load: a handshake that took too long), the reply is
    dropped by the server's socket, and the same connection may stay unusable. A retry
    (same command id, so the command still executes once) is sent on a connection of its
    own. The server here is a stand-in ROUTER that never answers on the connection that
    brought the first request, as the 100-site run's wallet never did."""
    sec = grid.security("market")
    sec.start(actx)
    router = actx.socket(zmq.ROUTER)
    router.linger = 0
    sec.serve(router, "tcp://127.0.0.1:*")
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.last_endpoint.decode()
    seen: list[tuple[bytes, str]] = []

    async def serve() -> None:
        while True:
            ident, *_, data = await router.recv_multipart()
            cmd_id = json.loads(data)["cmd_id"]
            seen.append((ident, cmd_id))
            if ident != seen[0][0]:  # not on the first connection
                rep = ReplyEnvelope(cmd_id=cmd_id, ok=True, result=Pong(node="market/x", uptime_s=1.0).model_dump())
                await router.send_multipart([ident, rep.model_dump_json().encode()])

    task = asyncio.create_task(serve())
    client = RpcClient(actx, grid.security("home-7"), endpoint, server_site="market")
    try:
        pong = await client.request(Ping(), timeout=1.0, retries=2, cmd_id="ping-1")
        assert pong.node == "market/x"
        assert [c for _, c in seen] == ["ping-1", "ping-1"] and seen[0][0] != seen[1][0]
        assert await client.request(Ping(), timeout=5.0) == pong  # the new connection serves what follows
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        router.close(0)
        sec.stop()


def stranger_keys(tmp_path):  # type: ignore[no-untyped-def]
    """A key pair that is not on the hub's allow-list."""
    d = tmp_path / "stranger"
    d.mkdir()
    pub, sec = zmq.auth.create_certificates(d, "stranger")
    return zmq.auth.load_certificate(sec)


async def test_a_peer_without_an_allowed_key_gets_nothing_and_sends_nothing(grid: Grid, actx, server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv, _ = server
    public, secret = stranger_keys(tmp_path)
    hub_key = grid.security("market").server_key("market")

    def stranger(kind: int) -> zmq.asyncio.Socket:
        s = actx.socket(kind)
        s.linger = 0
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = hub_key, public, secret
        return s

    # a legitimate subscriber and a legitimate publisher
    rec = Applied(Store(tmp_path / "sub.sqlite"))
    sub = rec.subscriber(actx, grid)
    await sub.start()
    legit = raw_socket(actx, grid, "solar-1", zmq.PUB, grid.hub_pub)
    # the stranger listens on the hub and tries to publish and to call the server
    spy = stranger(zmq.SUB)
    spy.subscribe(b"")
    spy.connect(grid.hub_sub)
    forger = stranger(zmq.PUB)
    forger.connect(grid.hub_pub)
    caller = stranger(zmq.DEALER)
    caller.connect(srv.endpoint)
    from services.bus import envelope
    good = envelope.encode(envelope.make(reading(7), source="solar-1/meter", seq=1))
    forged = envelope.encode(envelope.make(reading(666), source="solar-1/meter", seq=1))
    await caller.send(wrap(Ping(), "spy").model_dump_json().encode())
    for _ in range(40):
        await forger.send_multipart(forged)
        await legit.send_multipart(good)
        await asyncio.sleep(0.05)
    await until(lambda: rec.values() == [7])
    assert await spy.poll(500) == 0, "the stranger received an event"
    assert await caller.poll(500) == 0, "the stranger got a reply"
    assert rec.values() == [7]
    for s in (spy, forger, caller, legit):
        s.close(0)
    await sub.stop()


async def test_prefetch_runs_outside_the_transaction_and_a_retry_skips_it(grid: Grid, actx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec, store, srv = market_server(grid, actx, tmp_path, "offer TEXT, seen TEXT")
    fetched: list[str] = []

    async def prefetch(req: CancelOffer, caller: Caller) -> str:
        assert not store.in_transaction
        fetched.append(req.offer_id)
        if req.offer_id == "gone":
            raise RequestError("not_found", "asked elsewhere: no such offer")
        return f"seen-{req.offer_id}"

    async def cancel(req: CancelOffer, caller: Caller, seen: str) -> Ok:
        assert store.in_transaction
        store.conn.execute("INSERT INTO cancels VALUES (?, ?)", (req.offer_id, seen))
        return Ok()

    srv.handle(CancelOffer, cancel, prefetch=prefetch)
    await srv.start()
    client = RpcClient(actx, grid.security("home-7"), srv.endpoint)
    for _ in range(3):
        assert await client.request(CancelOffer(offer_id="o-1", seller=ADDR), cmd_id="c-1") == Ok()
    with pytest.raises(RequestError) as e:
        await client.request(CancelOffer(offer_id="gone", seller=ADDR))
    assert e.value.code == "not_found"
    assert fetched == ["o-1", "gone"]
    assert list(store.conn.execute("SELECT offer, seen FROM cancels")) == [("o-1", "seen-o-1")]
    await client.close()
    await srv.stop()
    sec.stop()


async def test_a_handler_knows_which_site_asked_whatever_the_body_says(grid: Grid, actx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec, store, srv = market_server(grid, actx, tmp_path)
    seen: list[tuple[str, str | None]] = []

    async def cancel(req: CancelOffer, caller: Caller) -> Ok:
        seen.append((req.offer_id, caller.site))
        return Ok()

    async def ping(req: Ping, caller: Caller) -> Pong:
        return Pong(node=str(caller), uptime_s=0.0)

    srv.handle(CancelOffer, cancel)
    srv.handle(Ping, ping)
    await srv.start()
    clients = {site: RpcClient(actx, grid.security(site), srv.endpoint) for site in ("home-7", "probe")}
    try:
        assert (await clients["home-7"].request(Ping())).node == "home-7"
        assert (await clients["probe"].request(Ping())).node == "probe"
        # the same command id from two sites: two commands; neither site gets the other's reply
        await clients["home-7"].request(CancelOffer(offer_id="o-home", seller=ADDR), cmd_id="shared")
        await clients["probe"].request(CancelOffer(offer_id="o-probe", seller=ADDR), cmd_id="shared")
        await clients["home-7"].request(CancelOffer(offer_id="o-home", seller=ADDR), cmd_id="shared")  # a retry
        assert seen == [("o-home", "home-7"), ("o-probe", "probe")]
        # a request on a socket without CURVE has no identity
        assert (await srv.execute(wrap(Ping(), "local").model_dump_json().encode())).result == \
            {"node": "(no identity)", "uptime_s": 0.0}
    finally:
        for c in clients.values():
            await c.close()
        await srv.stop()
        sec.stop()


def cancels_server(grid: Grid, actx, tmp_path, **kw) -> tuple[Any, Store, RpcServer]:  # type: ignore[no-untyped-def]
    """A market-keyed request server whose CancelOffer records the offer in ``cancels``."""
    sec, store, srv = market_server(grid, actx, tmp_path, "offer TEXT", **kw)

    async def cancel(req: CancelOffer, caller: Caller) -> Ok:
        store.conn.execute("INSERT INTO cancels VALUES (?)", (req.offer_id,))
        return Ok()

    srv.handle(CancelOffer, cancel)
    return sec, store, srv


async def test_a_flood_from_one_site_gets_busy_while_another_site_is_served(grid: Grid, actx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec, store, srv = cancels_server(grid, actx, tmp_path, max_inflight_per_site=4)
    gate = asyncio.Event()

    async def ping(req: Ping, caller: Caller) -> Pong:
        if caller.site == "probe":
            await gate.wait()  # the flood's requests hang: they hold their site's slots
        return Pong(node=str(caller), uptime_s=0.0)

    srv.handle(Ping, ping)
    await srv.start()
    probe = RpcClient(actx, grid.security("probe"), srv.endpoint, timeout_s=20)
    home = RpcClient(actx, grid.security("home-7"), srv.endpoint, timeout_s=20)
    try:
        flood = [asyncio.create_task(probe.request(Ping())) for _ in range(30)]
        await until(lambda: sum(t.done() for t in flood) >= 26)
        busy = [t for t in flood if t.done()]
        assert len(busy) == 26 and all(isinstance(t.exception(), RequestError) and t.exception().code == "busy"
                                       for t in busy)
        assert "nothing was done" in busy[0].exception().message
        # a busy command was not done and is not remembered: the same id runs later
        with pytest.raises(RequestError) as e:
            await probe.request(CancelOffer(offer_id="o-later", seller=ADDR), cmd_id="later")
        assert e.value.code == "busy" and cancels(store) == []
        # meanwhile another site is served at once
        for _ in range(10):
            assert (await home.request(Ping(), timeout=5)).node == "home-7"
        assert srv.inflight["probe"] == 4 and srv.busy.get("home-7", 0) == 0
        gate.set()
        assert [(await t).node for t in flood if t not in busy] == ["probe"] * 4
        assert await probe.request(CancelOffer(offer_id="o-later", seller=ADDR), cmd_id="later") == Ok()
        assert cancels(store) == ["o-later"] and "probe" not in srv.inflight
    finally:
        gate.set()
        await probe.close()
        await home.close()
        await srv.stop()
        sec.stop()


async def test_stored_replies_are_pruned_by_age_and_kept_within_the_window(grid: Grid, actx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sec, store, srv = cancels_server(grid, actx, tmp_path, commands_keep_s=3600)
    await srv.start()
    client = RpcClient(actx, grid.security("home-7"), srv.endpoint)
    try:
        for cid in ("old", "new"):
            await client.request(CancelOffer(offer_id=cid, seller=ADDR), cmd_id=cid)
        store.conn.execute("UPDATE bus_commands SET ts = ts - 7200 WHERE cmd_id = 'home-7|old'")
        assert await srv.prune() == 1
        assert [r[0] for r in store.conn.execute("SELECT cmd_id FROM bus_commands")] == ["home-7|new"]
        await client.request(CancelOffer(offer_id="new", seller=ADDR), cmd_id="new")  # within the window: once
        assert cancels(store) == ["old", "new"]
    finally:
        await client.close()
        await srv.stop()
        sec.stop()


def test_drop_counts_keep_a_bounded_set_of_causes() -> None:
    from services.bus.sockets import DropCounter

    d = DropCounter("test")
    for i in range(1000):
        d.drop(f"cause-{i}" * 20, "x" * 10_000)
    assert len(d.counts) <= DropCounter.MAX_CAUSES + 1 and sum(d.counts.values()) == 1000
    assert all(len(c) <= 60 for c in d.counts) and d.counts["other"] > 0


async def test_a_site_put_on_the_allow_list_while_the_hub_runs_joins_without_a_restart(  # type: ignore[no-untyped-def]
        grid: Grid, actx, tmp_path) -> None:
    """A site's key made (or copied into allowed/) after the hub started: the hub's ZAP
    handler does not know it and reads the folder again, and the site gets in (on one host,
    `docker compose up` of every profile starts the hub while the sites' `keys` runs may
    still be writing their keys)."""
    from services.bus import Publisher, ensure_keys

    rec = Applied(Store(tmp_path / "sub.sqlite"))
    sub = rec.subscriber(actx, grid)
    await sub.start()
    await asyncio.sleep(1.1)  # the hub's handler read allowed/ longer ago than it waits between reads
    ensure_keys(grid.keys, "late")
    late = Security(grid.keys, "late")
    late.start(actx)
    pub = Publisher(actx, late, Store(tmp_path / "pub.sqlite"), source="late/meter", hub_pub=grid.hub_pub,
                    heartbeat_s=0.2)
    await pub.start()
    await pub.publish(reading(1, site="late"))
    await pub.publish(reading(2, site="late"))
    await until(lambda: rec.values() == [1, 2], timeout=30)
    await pub.stop()
    late.stop()
    await sub.stop()
