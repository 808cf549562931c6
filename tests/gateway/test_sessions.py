"""Sessions outlive the processes around them: a restarted gateway still knows its
sessions (kept in its store, the token only as a digest), and after the wallet (the chain
service) restarts, the session stays and asks for the passphrase again."""

from __future__ import annotations

import hashlib
import logging
import pathlib
import sqlite3
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.gateway import Stack, error_of, http, login
from tests.support.plan import RealStack




def stored(data_dir: pathlib.Path) -> bytes:
    """Every byte of the gateway's store on disk (the database and its write-ahead log)."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("gateway.sqlite*")))


def rows(data_dir: pathlib.Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data_dir / "gateway.sqlite") as conn:
        return list(conn.execute("SELECT digest, address, expires_at FROM gateway_sessions"))


def token_of(h: aiohttp.ClientSession, cookie: str) -> str:
    return next(c.value for c in h.cookie_jar if c.key == cookie)


async def test_a_session_survives_a_gateway_restart_and_only_its_digest_is_stored(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    first = stack.gateways["home-7"]
    data_dir, cookie = first.settings.data_dir, first.gateway.cookie
    consumer = stack.consumer
    async with http() as h:
        who = await login(h, first.url, consumer)
        token = token_of(h, cookie)
        await first.stop()
        # a fresh gateway over the same data dir: the same cookie is the same session, no new login
        again = await stack.add_gateway("home-7", name="home-7-again", data_dir=data_dir)
        async with h.get(again.url + "/api/session") as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {**who, "unlocked": True}
        async with h.post(again.url + "/api/escrow/deposit", json={"amount_wei": "1000"}) as r:
            assert r.status == 202, await r.text()  # an action that signs: the key is still unlocked
        async with h.get(again.url + "/api/wallet") as r:
            assert r.status == 200 and (await r.json())["unlocked"] is True

        # on disk: the account, the expiry and the token's SHA-256; never the token nor the passphrase
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert [(d, a) for d, a, _ in rows(data_dir)] == [(digest, consumer.address)]
        raw = stored(data_dir)
        assert digest.encode() in raw  # the file searched is the one that holds the session
        assert token.encode() not in raw and consumer.passphrase.encode() not in raw

        # logout deletes the row; the cookie is no session afterwards, also after another restart
        async with h.delete(again.url + "/api/session") as r:
            assert r.status == 200
        assert rows(data_dir) == []
        h.cookie_jar.update_cookies({cookie: token})
        async with h.get(again.url + "/api/session") as r:
            assert r.status == 401 and (await error_of(r))["code"] == "no_session"
    assert token not in caplog.text and consumer.passphrase not in caplog.text


async def test_an_expired_session_is_refused_after_a_restart_and_pruned(stack: Stack) -> None:
    # the third account: a short session unlocks its key at the chain for as short a time
    short = await stack.add_gateway("home-7", name="short", session_ttl_s=2.0)
    data_dir, cookie = short.settings.data_dir, short.gateway.cookie
    async with http() as h:
        await login(h, short.url, stack.third)
        token = token_of(h, cookie)
        assert len(rows(data_dir)) == 1
        await short.stop()
        again = await stack.add_gateway("home-7", name="short-again", data_dir=data_dir, session_ttl_s=2.0)

        async def refused() -> bool:
            h.cookie_jar.update_cookies({cookie: token})  # the browser would have dropped it: present it anyway
            async with h.get(again.url + "/api/session") as r:
                return r.status == 401 and (await error_of(r))["code"] == "no_session"
        await stack.until("the two-second session to be refused", refused)
        h.cookie_jar.update_cookies({cookie: token})
        async with h.post(again.url + "/api/escrow/deposit", json={"amount_wei": "1000"}) as r:
            assert r.status == 401 and (await error_of(r))["code"] == "no_session"
        await again.prune_sessions()  # (or already at its start, if the session had expired by then)
        assert rows(data_dir) == []


# --- the wallet restarts ----------------------------------------------------------------


@pytest.fixture
def wallet_grid(tmp_path: pathlib.Path) -> Iterator[RealStack]:
    """Its own small grid (anvil, hub, the operator, home-7's wallet): the wallet is restarted
    here, and on anvil the chain outlives it."""
    grid = RealStack(tmp_path / "grid", chain_url="anvil", time_scale=1440,
                     only=("anvil", "hub", "chain", "wallet-home-7"), extra_accounts=[("third", "home-7 third")], scrypt_n=2**10,
                     env={"GRIDTRADE_HEARTBEAT_S": "0.5"})
    grid.start()
    try:
        yield grid
    finally:
        grid.stop()


@pytest.mark.anvil
@pytest.mark.timeout(300)
async def test_after_the_wallet_restarts_actions_answer_locked_until_the_passphrase_is_given_again(
        wallet_grid: RealStack, tmp_path: pathlib.Path) -> None:
    grid = wallet_grid
    s = Stack(grid, tmp_path / "gateways")
    try:
        # a small throttle window, so the test can wait out the back-off of two failures
        gw = await s.add_gateway("home-7", login_max_failures=2, login_window_s=1.0, login_max_delay_s=1.0)
        base, consumer = gw.url, s.consumer
        deposit = {"amount_wei": "1000"}
        async with http() as h:
            who = await login(h, base, consumer)
            await s.settled_wallet(h, "home-7")  # the dev chain's funding of a new account
            async with h.post(base + "/api/escrow/deposit", json=deposit) as r:
                assert r.status == 202, await r.text()

            # the wallet restarts: it held the unlocked key in memory only
            grid.terminate("wallet-home-7")
            grid.spawn("wallet-home-7")
            await grid.until("the restarted wallet to be healthy",
                             lambda: (grid.health("wallet-home-7") or {}).get("market"), timeout=90)

            async def answer() -> tuple[int, str] | None:
                async with h.post(base + "/api/escrow/deposit", json=deposit) as r:
                    if r.status == 503:  # the gateway's client is still reaching the new process
                        return None
                    return r.status, (await error_of(r))["code"]
            assert await s.until("the deposit to be answered after the restart", answer) == (401, "locked")
            async with h.post(base + "/api/transfers", json={"to": s.third.address, "amount_wei": "5"}) as r:
                err = await error_of(r)
                assert (r.status, err["code"]) == (401, "locked") and "passphrase again" in err["message"]
            # the session stays, and says the key is locked
            async with h.get(base + "/api/session") as r:
                assert r.status == 200 and await r.json() == {**who, "unlocked": False}
            async with h.get(base + "/api/wallet") as r:
                assert r.status == 200 and (await r.json())["unlocked"] is False

            # a wrong passphrase is refused and counted by the throttle: the third try waits,
            # whatever the passphrase
            for _ in range(2):
                async with h.post(base + "/api/session/unlock", json={"passphrase": "not it"}) as r:
                    assert r.status == 401 and (await error_of(r))["code"] == "bad_credentials"
            async with h.post(base + "/api/session/unlock", json={"passphrase": consumer.passphrase}) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) > 0
                assert (await error_of(r))["code"] == "too_many_attempts"
            async with h.post(base + "/api/escrow/deposit", json=deposit) as r:
                assert r.status == 401 and (await error_of(r))["code"] == "locked"
            async with h.get(base + "/metrics") as r:
                assert 'gridtrade_gateway_logins_total{outcome="failed"} 2.0' in await r.text()
            # the session's account only: the body names nothing else
            async with h.post(base + "/api/session/unlock", json={"passphrase": consumer.passphrase,
                                                                  "address": s.third.address}) as r:
                assert r.status == 422

            # once the back-off is over, the right passphrase unlocks the same account for the session
            async def unlocked() -> dict[str, Any] | None:
                async with h.post(base + "/api/session/unlock", json={"passphrase": consumer.passphrase}) as r:
                    return dict(await r.json()) if r.status == 200 else None
            assert await s.until("the unlock to be allowed again", unlocked) == {**who, "unlocked": True}
            async with h.post(base + "/api/escrow/deposit", json=deposit) as r:
                assert r.status == 202, await r.text()
            async with h.get(base + "/api/session") as r:
                assert (await r.json())["unlocked"] is True
            await s.settled_wallet(h, "home-7")
    finally:
        await s.aclose()
