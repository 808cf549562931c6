// The web UI: login, wallet and marketplace, kept live by the websocket at /api/ws.

import { api, ApiError } from './api.js';
import { Charts } from './charts.js';
import { countdown, formatEther, kwh, parseEther, parseKwh, short } from './format.js';

const $ = (sel, root = document) => root.querySelector(sel);

const state = {
  me: null,            // {address, site, expires_at, unlocked}
  locked: false,       // the wallet holds this account's key locked (it restarted): ask for the passphrase
  offers: new Map(),   // offer_id -> offer
  trades: new Map(),   // trade_id -> trade
  pending: new Map(),  // tx_hash -> tx
  clockSkew: 0,        // server time - local time, seconds
  ws: null,
  wsRetry: 0,
  charts: null,
};

// --- messages to the person ----------------------------------------------------------

let toastTimer = null;
function say(message, ok = false) {
  const t = $('#toast');
  t.textContent = message;
  t.classList.toggle('ok', ok);
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, ok ? 3000 : 8000);
}

// the session is there but the wallet's key is locked (the wallet restarted): nothing was done
const isLocked = (e) => e instanceof ApiError && e.status === 401 && e.code === 'locked';

function explain(e) {
  if (e instanceof ApiError && e.status === 401 && e.code === 'no_session') {
    loggedOut();
    return 'Your session has ended. Please log in again.';
  }
  if (isLocked(e)) setLocked(true);
  return (e && e.message) ? e.message : 'Something went wrong.';
}

// An action; if the wallet answers that the key is locked, ask for the passphrase and,
// once it is unlocked again, do the action once more (the locked attempt did nothing).
async function guarded(button, fn) {
  if (button) button.disabled = true;
  try {
    try {
      return await fn();
    } catch (e) {
      if (!isLocked(e)) throw e;
      if (!(await askUnlock())) throw e;
      return await fn();
    }
  } catch (e) {
    say(explain(e));
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

// --- the key locked in the wallet: the passphrase again, same account, same session --

let unlockWaiters = [];

function setLocked(on) {
  state.locked = on;
  $('#locked').hidden = !on;
  document.body.dataset.locked = on ? '1' : '';
}

// Opens the prompt (once, however many actions wait); resolves true once unlocked, false if dismissed.
function askUnlock() {
  setLocked(true);
  const dlg = $('#unlock-dialog');
  $('#unlock-account').textContent = state.me ? state.me.address : '';
  if (!dlg.open) {
    $('#unlock-error').textContent = '';
    dlg.showModal();
    $('#unlock-passphrase').focus();
  }
  return new Promise((resolve) => { unlockWaiters.push(resolve); });
}

function unlockDone(ok) {
  const waiters = unlockWaiters;
  unlockWaiters = [];
  $('#unlock-passphrase').value = '';
  const dlg = $('#unlock-dialog');
  if (dlg.open) dlg.close();
  for (const w of waiters) w(ok);
}

async function unlock(ev) {
  ev.preventDefault();
  const btn = $('#unlock-btn');
  btn.disabled = true;
  $('#unlock-error').textContent = '';
  try {
    state.me = await api('POST', '/api/session/unlock', { passphrase: $('#unlock-passphrase').value });
    setLocked(false);
    unlockDone(true);
    say('Your wallet is unlocked again.', true);
    refreshWallet();
  } catch (e) {
    if (e instanceof ApiError && e.code === 'no_session') {
      unlockDone(false);
      say(explain(e));
      return;
    }
    $('#unlock-passphrase').value = '';
    $('#unlock-error').textContent = e.message || 'Unlocking failed.';
  } finally {
    btn.disabled = false;
  }
}

function showUnlocked(unlocked) {
  if (unlocked === false) setLocked(true);
  if (unlocked === true && state.locked) { setLocked(false); unlockDone(true); }  // unlocked elsewhere
}

// the session's state now and then: a wallet that restarted shows as locked before an action fails
async function checkSession() {
  if (!state.me) return;
  try {
    const me = await api('GET', '/api/session');
    if (state.me) { state.me = me; showUnlocked(me.unlocked); }
  } catch (e) {
    if (e instanceof ApiError && e.code === 'no_session') say(explain(e));
  }
}

// --- routing -------------------------------------------------------------------------

function show(view) {
  for (const v of ['login', 'wallet', 'market']) $(`#view-${v}`).hidden = v !== view;
  $('#dock').hidden = view === 'login';
  $('#nav-wallet').classList.toggle('active', view === 'wallet');
  $('#nav-market').classList.toggle('active', view === 'market');
  if (view !== 'login' && state.charts) state.charts.ensure();
}

function route() {
  if (!state.me) { show('login'); return; }
  const view = location.hash === '#/market' ? 'market' : 'wallet';
  show(view);
  if (view === 'market') { loadMarket(); } else { loadWallet(); }
}

// --- login / logout ------------------------------------------------------------------

async function loadAccounts() {
  const sel = $('#account');
  try {
    const { accounts } = await api('GET', '/api/accounts');
    sel.replaceChildren(...accounts.map((a) => {
      const o = document.createElement('option');
      o.value = a.address;
      o.textContent = `${a.name || 'account'} — ${a.address}`;
      return o;
    }));
    $('#login-error').textContent = accounts.length ? '' : 'No accounts on this site yet (create one with gridtrade account).';
  } catch (e) {
    $('#login-error').textContent = explain(e);
  }
}

async function login(ev) {
  ev.preventDefault();
  const btn = $('#login-btn');
  btn.disabled = true;
  $('#login-error').textContent = '';
  try {
    state.me = await api('POST', '/api/session', { address: $('#account').value, passphrase: $('#passphrase').value });
    $('#passphrase').value = '';
    loggedIn();
  } catch (e) {
    $('#login-error').textContent = e.message || 'Login failed.';
  } finally {
    btn.disabled = false;
  }
}

function loggedIn() {
  $('#who').textContent = short(state.me.address);
  $('#who').title = state.me.address;
  $('#site-name').textContent = state.me.site;
  showUnlocked(state.me.unlocked);
  connect();
  if (!location.hash || location.hash === '#/login') location.hash = '#/wallet';
  route();
}

function loggedOut() {
  state.me = null;
  setLocked(false);
  unlockDone(false);
  if (state.ws) { state.ws.onclose = null; state.ws.close(); state.ws = null; }
  setLive(false);
  state.offers.clear(); state.trades.clear(); state.pending.clear();
  location.hash = '#/login';
  show('login');
  loadAccounts();
}

async function logout() {
  await guarded($('#logout'), async () => {
    try { await api('DELETE', '/api/session'); } catch (e) { if (!(e instanceof ApiError && e.status === 401)) throw e; }
    loggedOut();
  });
}

// --- wallet --------------------------------------------------------------------------

let walletTimer = null;
function refreshWallet() { clearTimeout(walletTimer); walletTimer = setTimeout(loadWallet, 150); }

async function loadWallet() {
  if (!state.me) return;
  try {
    const w = await api('GET', '/api/wallet');
    $('#tokens').textContent = kwh(w.tokens_wh);
    $('#tokens-locked').textContent = kwh(w.tokens_locked_wh);
    $('#generation').textContent = kwh(w.generated_wh);
    $('#balance').textContent = formatEther(w.ether_wei);
    $('#credit').textContent = formatEther(w.credit_wei);
    state.credit = w.credit_wei;
    $('#withdraw-credit').hidden = BigInt(w.credit_wei) === 0n;
    $('#escrow-free').textContent = formatEther(w.escrow_free_wei);
    $('#escrow-locked').textContent = formatEther(w.escrow_locked_wei);
    $('#escrow-reserved').textContent = formatEther(w.escrow_reserved_wei || '0');
    $('#reserved-until').textContent = BigInt(w.escrow_reserved_wei || '0') > 0n && w.reserved_until
      ? ` until ${new Date(w.reserved_until * 1000).toLocaleTimeString()}` : '';
    $('#market-tokens').textContent = kwh(w.tokens_wh);
    $('#market-escrow').textContent = formatEther(w.escrow_free_wei);
    state.pending = new Map(w.pending.map((t) => [t.tx_hash, t]));
    renderPending();
    showUnlocked(w.unlocked);
  } catch (e) {
    say(explain(e));
  }
  loadMining();
}

function renderPending() {
  const ul = $('#pending');
  ul.replaceChildren(...[...state.pending.values()].map((t) => {
    const li = document.createElement('li');
    li.dataset.hash = t.tx_hash;
    // where it is on its way: pending, replaced with higher fees (same nonce), mined but
    // not yet at the confirmation depth, or failed with the node's reason
    const where = {
      replaced: 'replaced with higher fees',
      mined: t.depth_required ? `mined, ${t.depth ?? 0} of ${t.depth_required} confirmations` : 'mined',
      failed: `failed: ${t.reason || 'refused'}`,
    }[t.state] || 'pending';
    li.textContent = `${t.tx_hash} (${t.kind || 'tx'}) · ${where}`;
    return li;
  }));
  $('#pending-empty').hidden = state.pending.size > 0;
}

async function loadMining() {
  try { showMining(await api('GET', '/api/mining')); } catch (e) { /* shown elsewhere */ }
}

function showMining(m) {
  $('#mining-state').textContent = m.supported ? (m.mining ? 'on' : 'off') : 'not controllable here';
  $('#mining-detail').textContent = m.detail || '';
  // only the market's site may start and stop mining: elsewhere the buttons stay disabled
  const control = m.supported && m.controllable !== false;
  $('#mining-start').disabled = !control || m.mining;
  $('#mining-stop').disabled = !control || !m.mining;
}

async function setMining(action, button) {
  await guarded(button, async () => showMining(await api('POST', '/api/mining', { action })));
}

function amountForm(formSel, inputSel, path, done) {
  $(formSel).addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const btn = $(`${formSel} button`);
    await guarded(btn, async () => {
      const amount_wei = parseEther($(inputSel).value);
      const r = await api('POST', path, { amount_wei });
      $(inputSel).value = '';
      done(r);
    });
  });
}

async function transfer(ev) {
  ev.preventDefault();
  await guarded($('#transfer-btn'), async () => {
    const to = $('#transfer-to').value.trim();
    if (!/^0x[0-9a-fA-F]{40}$/.test(to)) throw new Error('The recipient is an account address: 0x followed by 40 hex digits.');
    const amount_wei = parseEther($('#transfer-amount').value);
    const r = await api('POST', '/api/transfers', { to, amount_wei });
    $('#transfer-result').textContent = `sent: ${r.tx_hash}`;
    $('#transfer-amount').value = '';
    addPending({ tx_hash: r.tx_hash, kind: 'transfer', status: 'pending' });
  });
}

function addPending(tx) {
  if (tx.status === 'pending') state.pending.set(tx.tx_hash, tx); else state.pending.delete(tx.tx_hash);
  renderPending();
}

// --- marketplace ---------------------------------------------------------------------

async function loadMarket() {
  if (!state.me) return;
  try {
    const [offers, trades] = await Promise.all([api('GET', '/api/offers'), api('GET', '/api/trades')]);
    state.clockSkew = offers.now - Date.now() / 1000;
    state.offers = new Map(offers.offers.map((o) => [o.offer_id, o]));
    state.trades = new Map(trades.trades.map((t) => [t.trade_id, t]));
    renderOffers();
    renderTrades();
  } catch (e) {
    say(explain(e));
  }
  refreshWallet();
}

let marketTimer = null;
function refreshMarket() { clearTimeout(marketTimer); marketTimer = setTimeout(loadMarket, 200); }

const mine = (addr) => state.me && addr && addr.toLowerCase() === state.me.address.toLowerCase();
const etherPerKwh = (wei) => formatEther(wei, 9);

function renderOffers() {
  const box = $('#offers');
  // open offers, and those that closed while this page watched (their countdown shows how they ended)
  const open = [...state.offers.values()].filter((o) => o.state === 'open' || o.closedHere);
  const cards = open.map((o) => {
    let card = box.querySelector(`[data-offer="${CSS.escape(o.offer_id)}"]`);
    if (!card) {
      card = $('#offer-card').content.firstElementChild.cloneNode(true);
      card.dataset.offer = o.offer_id;
      card.querySelector('.bid-form').addEventListener('submit', (ev) => bid(ev, o.offer_id, card));
    }
    card.classList.toggle('mine', mine(o.seller));
    card.querySelector('.kwh').textContent = kwh(o.wh);
    card.querySelector('.seller').textContent = short(o.seller);
    card.querySelector('.seller').title = o.seller;
    card.querySelector('.site').textContent = o.seller_site;
    card.querySelector('.start').textContent = etherPerKwh(o.start_price_wei_per_kwh);
    card.querySelector('.highest').textContent = o.highest_bid_wei_per_kwh != null ? `${etherPerKwh(o.highest_bid_wei_per_kwh)} Ether/kWh` : 'none';
    card.querySelector('.bidder').textContent = o.highest_bidder ? `by ${short(o.highest_bidder)}${mine(o.highest_bidder) ? ' (you)' : ''}` : '';
    card.querySelector('.bid-form').hidden = mine(o.seller) || o.state !== 'open';
    card.classList.toggle('closed', o.state !== 'open');
    card.dataset.state = o.state;
    card.dataset.endsAt = o.ends_at;
    return card;
  });
  if (cards.length) box.replaceChildren(...cards); else box.innerHTML = '<p class="sub empty">no open offers</p>';
  tick();
}

function tick() {
  const now = Date.now() / 1000 + state.clockSkew;
  for (const card of document.querySelectorAll('#offers [data-offer]')) {
    const left = Number(card.dataset.endsAt) - now;
    const st = card.dataset.state;
    card.querySelector('.countdown').textContent = st && st !== 'open' ? `ended (${st})` : countdown(left);
    const form = card.querySelector('.bid-form');
    if (left <= 0) form.querySelector('button').disabled = true;
  }
}

async function sell(ev) {
  ev.preventDefault();
  await guarded($('#sell-btn'), async () => {
    const body = {
      kwh: parseKwh($('#sell-kwh').value),
      start_price_wei_per_kwh: parseEther($('#sell-price').value),
      duration_s: parseInt($('#sell-duration').value, 10),
    };
    if (!(body.duration_s > 0)) throw new Error('The duration is a whole number of seconds, more than 0.');
    const r = await api('POST', '/api/offers', body);
    say(`Offer ${r.offer_id} is on the market.`, true);
    $('#sell-kwh').value = '';
    refreshMarket();
  });
}

async function bid(ev, offerId, card) {
  ev.preventDefault();
  const input = card.querySelector('.bid-price');
  await guarded(card.querySelector('.bid-btn'), async () => {
    const price = parseEther(input.value);
    await api('POST', `/api/offers/${encodeURIComponent(offerId)}/bids`, { price_wei_per_kwh: price });
    input.value = '';
    say('Your bid is in.', true);
  });
}

const LIVE = new Set(['recorded', 'delivering']);

function renderTrades() {
  const box = $('#trades');
  const list = [...state.trades.values()].sort((a, b) => (a.trade_id < b.trade_id ? 1 : -1));
  const cards = list.map((t) => {
    let card = box.querySelector(`[data-trade="${CSS.escape(t.trade_id)}"]`);
    if (!card) {
      card = $('#trade-card').content.firstElementChild.cloneNode(true);
      card.dataset.trade = t.trade_id;
      card.querySelector('.close-btn').addEventListener('click', (e) => closeTrade(t.trade_id, e.target));
    }
    card.classList.toggle('mine', mine(t.buyer) || mine(t.seller));
    card.classList.toggle('closed', !LIVE.has(t.state) && t.state !== 'agreed');
    card.dataset.state = t.state;
    card.querySelector('.kwh').textContent = kwh(t.wh);
    card.querySelector('.state').textContent = t.state;
    card.querySelector('.seller').textContent = short(t.seller);
    card.querySelector('.seller').title = t.seller;
    card.querySelector('.seller-site').textContent = t.seller_site;
    card.querySelector('.buyer').textContent = short(t.buyer);
    card.querySelector('.buyer').title = t.buyer;
    card.querySelector('.buyer-site').textContent = t.buyer_site;
    card.querySelector('.price').textContent = etherPerKwh(t.price_wei_per_kwh);
    card.querySelector('.delivered').textContent = t.delivered_wh;
    card.querySelector('.paid').textContent = formatEther(t.paid_wei || '0', 9);
    const reason = card.querySelector('.reason');  // why it closed or failed, when it says
    reason.textContent = t.reason || '';
    reason.hidden = !t.reason;
    card.querySelector('.close-btn').hidden = !(mine(t.buyer) && LIVE.has(t.state));
    return card;
  });
  if (cards.length) box.replaceChildren(...cards); else box.innerHTML = '<p class="sub empty">no trades yet</p>';
}

async function closeTrade(tradeId, button) {
  await guarded(button, async () => {
    await api('POST', `/api/trades/${encodeURIComponent(tradeId)}/close`, {});
    say('Connection closed: the relays open and the unspent escrow is freed.', true);
  });
}

// --- the live feed -------------------------------------------------------------------

function setLive(on) {
  const el = $('#live');
  el.textContent = on ? 'live' : 'offline';
  el.classList.toggle('on', on);
}

function connect() {
  if (state.ws || !state.me) return;
  const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/api/ws`);
  state.ws = ws;
  ws.onopen = () => { state.wsRetry = 0; setLive(true); };
  ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (e) { console.warn('bad event', e); } };
  ws.onclose = (ev) => {
    state.ws = null;
    setLive(false);
    if (ev.code === 4401) { say('Your session has ended. Please log in again.'); loggedOut(); return; }
    if (!state.me) return;
    const delay = Math.min(10000, 500 * 2 ** state.wsRetry++);
    setTimeout(() => { connect(); if (state.me) { loadWallet(); loadMarket(); } }, delay);
  };
}

function onEvent(msg) {
  const b = msg.body;
  switch (msg.type) {
    case 'hello':
      document.body.dataset.live = '1';
      break;
    case 'market.offer_opened':
      state.offers.set(b.offer_id, { ...b, state: 'open', highest_bid_wei_per_kwh: null, highest_bidder: null, bids: 0 });
      renderOffers();
      break;
    case 'market.bid_placed': {
      const o = state.offers.get(b.offer_id);
      if (o) { o.highest_bid_wei_per_kwh = b.price_wei_per_kwh; o.highest_bidder = b.buyer; o.bids += 1; renderOffers(); }
      state.charts.bid(msg.ts, Number(etherPerKwh(b.price_wei_per_kwh)));
      break;
    }
    case 'market.offer_closed': {
      const o = state.offers.get(b.offer_id);
      if (o) { o.state = b.outcome; o.closedHere = true; renderOffers(); }
      break;
    }
    case 'trade.agreed':
    case 'trade.status': {
      const t = state.trades.get(b.trade_id) || { paid_wei: '0', delivered_wh: 0, state: 'agreed' };
      Object.assign(t, b);
      if (msg.type === 'trade.agreed') { t.state = t.state || 'agreed'; state.charts.trade(msg.ts, Number(etherPerKwh(b.price_wei_per_kwh))); }
      state.trades.set(b.trade_id, t);
      renderTrades();
      refreshWallet();
      break;
    }
    case 'chain.settled':
    case 'chain.trade_closed': {
      const t = state.trades.get(b.trade_id);
      if (t) { t.paid_wei = b.paid_wei; t.delivered_wh = b.delivered_wh; renderTrades(); }
      refreshWallet();
      break;
    }
    case 'chain.tx':
      addPending(b);
      if (b.status !== 'pending') refreshWallet();
      if (b.status === 'failed') say(`Transaction ${short(b.tx_hash)} (${b.kind}) failed: ${b.reason || 'no reason given'}`);
      break;
    case 'chain.minted':
      refreshWallet();
      break;
    case 'chain.mining':
      loadMining();
      break;
    case 'meter.reading':
      state.charts.reading(msg.ts, b);
      break;
    default:
      break;
  }
}

// --- start ---------------------------------------------------------------------------

async function start() {
  state.charts = new Charts($('#chart-energy'), $('#chart-price'));
  $('#login-form').addEventListener('submit', login);
  $('#logout').addEventListener('click', logout);
  $('#mining-start').addEventListener('click', (e) => setMining('start', e.target));
  $('#mining-stop').addEventListener('click', (e) => setMining('stop', e.target));
  $('#transfer-form').addEventListener('submit', transfer);
  $('#sell-form').addEventListener('submit', sell);
  amountForm('#deposit-form', '#deposit-amount', '/api/escrow/deposit', (r) => addPending({ tx_hash: r.tx_hash, kind: 'deposit', status: 'pending' }));
  amountForm('#withdraw-form', '#withdraw-amount', '/api/escrow/withdraw', (r) => addPending({ tx_hash: r.tx_hash, kind: 'withdraw', status: 'pending' }));
  $('#withdraw-credit').addEventListener('click', (e) => guarded(e.target, async () => {
    const r = await api('POST', '/api/credit/withdraw', { amount_wei: state.credit });
    addPending({ tx_hash: r.tx_hash, kind: 'withdraw_credit', status: 'pending' });
  }));
  $('#unlock-form').addEventListener('submit', unlock);
  $('#unlock-cancel').addEventListener('click', () => unlockDone(false));
  $('#unlock-dialog').addEventListener('close', () => unlockDone(false));  // Escape, too
  $('#locked-unlock').addEventListener('click', () => { askUnlock(); });
  window.addEventListener('hashchange', route);
  setInterval(tick, 250);
  setInterval(checkSession, 10000);
  try {
    state.me = await api('GET', '/api/session');
    loggedIn();
  } catch (e) {
    loggedOut();
  }
}

start();
