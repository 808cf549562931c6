"""The session's account at this site's wallet: balances and pending transactions, Ether
sent, escrow moved, credit taken out, and whether blocks are mined."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.bus import commands as cmd
from services.bus import refusals

from .. import models as m
from ..errors import ApiError
from ..openapi import Route
from ..sessions import Session
from ..state import Gateway
from .api import BACKEND, SESSION_ERRORS, Api

api = Api()

_SENDS = (400, 401, 409, 415, 422, *BACKEND)


async def _pending(gw: Gateway, address: str) -> list[m.TxOut]:
    reply: cmd.Pending = await gw.ask_chain(cmd.ListPending(account=address))
    return [m.TxOut(tx_hash=t.tx_hash, kind=t.kind, ref=t.ref, status=t.status, state=t.state, reason=t.reason,
                    nonce=t.nonce, current_hash=t.current_hash, depth=t.depth, depth_required=t.depth_required)
            for t in reply.txs]


@api(Route("GET", "/api/wallet", "wallet", "Tokens, generation, Ether, escrow and pending transactions", m.WalletOut,
           errors=(*SESSION_ERRORS, 502)))
async def wallet(gw: Gateway, request: web.Request, session: Session) -> m.WalletOut:
    bal, pending, unlocked = await asyncio.gather(gw.ask_chain(cmd.GetBalances(address=session.address)),
                                                  _pending(gw, session.address),
                                                  gw.is_unlocked(session.address))
    return m.WalletOut(address=session.address, site=gw.site, ether_wei=bal.ether_wei,
                       escrow_free_wei=bal.escrow_free_wei, escrow_reserved_wei=bal.escrow_reserved_wei,
                       reserved_until=bal.reserved_until, escrow_locked_wei=bal.escrow_locked_wei,
                       credit_wei=bal.credit_wei, tokens_wh=bal.tokens_wh, tokens_locked_wh=bal.tokens_locked_wh,
                       generated_wh=bal.generated_wh, pending=pending, unlocked=unlocked)


@api(Route("GET", "/api/pending", "pending", "This account's pending transactions", m.PendingOut,
           errors=(*SESSION_ERRORS, 502)))
async def pending(gw: Gateway, request: web.Request, session: Session) -> m.PendingOut:
    return m.PendingOut(txs=await _pending(gw, session.address))


@api(Route("POST", "/api/transfers", "transfer", "Send Ether to another participant", m.TxSentOut,
           body=m.TransferIn, status=202, errors=_SENDS))
async def transfer(gw: Gateway, request: web.Request, session: Session, body: m.TransferIn) -> m.TxSentOut:
    if body.to.lower() == session.address.lower():
        raise ApiError.of(refusals.Invalid, "to: that is your own account")
    sent: cmd.TxSent = await gw.ask_chain(
        cmd.Transfer(sender=session.address, to=body.to, amount_wei=body.amount_wei),
        gw.cmd_id(request, session, "transfer"))
    await gw.history.sent(account=session.address, kind="transfer", tx_hash=sent.tx_hash,
                          amount_wei=body.amount_wei, to=body.to)
    return m.TxSentOut(tx_hash=sent.tx_hash)


async def _escrow(gw: Gateway, request: web.Request, session: Session, action: str, amount: int) -> m.TxSentOut:
    sent: cmd.TxSent = await gw.ask_chain(
        cmd.Escrow(account=session.address, action=action, amount_wei=amount),  # type: ignore[arg-type]
        gw.cmd_id(request, session, action))
    await gw.history.sent(account=session.address, kind=action, tx_hash=sent.tx_hash, amount_wei=amount)
    return m.TxSentOut(tx_hash=sent.tx_hash)


@api(Route("POST", "/api/escrow/deposit", "escrow_deposit", "Move Ether into the market's escrow", m.TxSentOut,
           body=m.EscrowIn, status=202, errors=_SENDS))
async def escrow_deposit(gw: Gateway, request: web.Request, session: Session, body: m.EscrowIn) -> m.TxSentOut:
    return await _escrow(gw, request, session, "deposit", body.amount_wei)


@api(Route("POST", "/api/escrow/withdraw", "escrow_withdraw", "Take free escrow back", m.TxSentOut,
           body=m.EscrowIn, status=202, errors=_SENDS))
async def escrow_withdraw(gw: Gateway, request: web.Request, session: Session, body: m.EscrowIn) -> m.TxSentOut:
    return await _escrow(gw, request, session, "withdraw", body.amount_wei)


@api(Route("POST", "/api/credit/withdraw", "withdraw_credit", "Take out what buyers paid this seller", m.TxSentOut,
           body=m.EscrowIn, status=202, errors=_SENDS))
async def withdraw_credit(gw: Gateway, request: web.Request, session: Session, body: m.EscrowIn) -> m.TxSentOut:
    return await _escrow(gw, request, session, "withdraw_credit", body.amount_wei)


def _mining_out(r: cmd.Mining) -> m.MiningOut:
    return m.MiningOut(mining=r.mining, supported=r.supported, detail=r.detail, controllable=r.controllable)


@api(Route("GET", "/api/mining", "mining", "Whether blocks are being produced", m.MiningOut,
           errors=(*SESSION_ERRORS, 502)))
async def mining(gw: Gateway, request: web.Request, session: Session) -> m.MiningOut:
    return _mining_out(await gw.ask_chain(cmd.SetMining(action="status")))


@api(Route("POST", "/api/mining", "set_mining", "Start or stop mining", m.MiningOut, body=m.MiningIn,
           errors=_SENDS))
async def set_mining(gw: Gateway, request: web.Request, session: Session, body: m.MiningIn) -> m.MiningOut:
    return _mining_out(await gw.ask_chain(cmd.SetMining(action=body.action), gw.cmd_id(request, session, "mining")))
