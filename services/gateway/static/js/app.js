// The wallet: login, wallet, marketplace, history and figures, kept live by the websocket
// at /api/ws. Every amount is shown in the chosen Ether unit and kWh, rounded, with every
// digit on hover; every action says where it is until it is confirmed or failed.

import { initAgent, loadAgent, renderAgent } from './agent.js';
import { api, ApiError } from './api.js';
import { initOrders, loadOrders, onOrdersEvent, renderOrders, setOrdersMarket } from './orders.js';
import { draw } from './charts.js';
import { OPEN, TradeState } from './trade_states.js';
import {
  checkAddress, costWei, countdown, energyText, energyUnit, etherText, etherUnit, exactEther, fmtEnergy, fmtEther,
  kw, loadPrefs, parseEnergy, parseEther, prefs, priceText, savePrefs, short, siteTime,
} from './format.js';

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

const state = {
  me: null,             // {address, site, expires_at, unlocked}
  site: null,           // /api/site: role, clock, explorer, minimum increment
  role: 'consumer',
  locked: false,
  wallet: null,         // the last balances
  offers: new Map(),    // offer_id -> offer
  trades: new Map(),    // trade_id -> trade
  closing: new Set(),   // trade ids whose Close Connection is under way
  txs: new Map(),       // tx_hash -> tracked transaction
  history: [],
  prices: [],
  readings: [],
  figures: null,        // /api/figures: the site's figures per day of the chosen range
  figRange: null,       // {from, to} in site time (Unix s), or null for the site's current day
  clock: { wall: Date.now() / 1000, sim: Date.now() / 1000, scale: 1, simulated: false },
  clockSkew: 0,         // server time - local time, seconds
  ws: null,
  wsRetry: 0,
  view: 'login',
};

const mine = (addr) => !!(state.me && addr && addr.toLowerCase() === state.me.address.toLowerCase());
const serverNow = () => Date.now() / 1000 + state.clockSkew;
const simOf = (ts) => (ts == null ? null : state.clock.sim + (ts - state.clock.wall) * state.clock.scale);

// an amount element: rounded text, every digit on hover, the exact wei for whoever needs it
function amount(el, wei, { price = false, unit = false } = {}) {
  if (!el) return;
  if (wei == null) { el.textContent = '–'; el.removeAttribute('title'); return; }
  const text = price ? fmtEther(wei, 3) : fmtEther(wei);
  el.textContent = unit ? `${text} ${etherUnit()}${price ? '/kWh' : ''}` : text;
  el.title = `${exactEther(wei)} ${etherUnit()}${price ? '/kWh' : ''} exactly`;
  el.dataset.wei = String(wei);
}

function energy(el, wh) {
  if (!el) return;
  el.textContent = wh == null ? '–' : fmtEnergy(wh);
  if (wh != null) el.dataset.wh = String(wh);
}

// --- messages to the person ----------------------------------------------------------------

// a toast: words, and buttons for what would fix it; errors stay until dismissed or replaced
function toast(message, { bad = false, actions = [], ms } = {}) {
  const box = $('#toasts');
  const t = document.createElement('div');
  t.className = `toast${bad ? ' bad' : ''}`;
  if (bad) t.setAttribute('role', 'alert');
  const p = document.createElement('p');
  p.textContent = message;
  t.append(p);
  const row = document.createElement('div');
  row.className = 'buttons';
  for (const a of actions) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = a.label;
    b.addEventListener('click', () => { t.remove(); a.run(); });
    row.append(b);
  }
  const close = document.createElement('button');
  close.type = 'button';
  close.textContent = 'Dismiss';
  close.addEventListener('click', () => t.remove());
  row.append(close);
  t.append(row);
  for (const old of $$('.toast', box).slice(0, -3)) old.remove();
  box.append(t);
  setTimeout(() => t.remove(), ms || (bad ? 20000 : 6000));
  return t;
}

// what would fix a refusal, as a button (the gateway names it: deposit, withdraw, bid)
function fixActions(e, ctx = {}) {
  const fix = e && e.fix;
  if (!fix) return [];
  if (fix.action === 'deposit') {
    return [{ label: `Deposit ${etherText(fix.amount_wei)}`, run: () => prefill('#deposit-amount', fix.amount_wei) }];
  }
  if (fix.action === 'withdraw') {
    return [{ label: `Withdraw ${etherText(fix.amount_wei)}`, run: () => prefill('#withdraw-amount', fix.amount_wei) }];
  }
  if (fix.action === 'bid' && ctx.input) {
    return [{ label: `Bid ${priceText(fix.price_wei_per_kwh)}`,
      run: () => { ctx.input.value = exactEther(fix.price_wei_per_kwh); ctx.input.focus(); } }];
  }
  return [];
}

function prefill(sel, wei) {
  location.hash = '#/wallet';
  setTimeout(() => { const i = $(sel); i.value = exactEther(wei); i.focus(); }, 50);
}

const isLocked = (e) => e instanceof ApiError && e.status === 401 && e.code === 'locked';

function explain(e) {
  if (e instanceof ApiError && e.status === 401 && e.code === 'no_session') {
    loggedOut('Your session has ended. Please log in again.');
    return 'Your session has ended. Please log in again.';
  }
  if (isLocked(e)) setLocked(true);
  return (e && e.message) ? e.message : 'Something went wrong.';
}

function status(el, text, st = '') {
  if (!el) return;
  el.textContent = text;
  el.dataset.state = st;
}

// An action; if the wallet answers that the key is locked, ask for the passphrase and,
// once it is unlocked again, do the action once more (the locked attempt did nothing).
async function guarded(button, fn, { statusEl, ctx } = {}) {
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
    const words = explain(e);
    if (!(e instanceof FieldError)) {  // a field's mistake is said next to the field
      if (statusEl) status(statusEl, words, 'refused');
      toast(words, { bad: true, actions: fixActions(e, ctx) });
    }
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

// a mistake in a field: said next to it, the field marked, nothing sent
class FieldError extends Error {}

function fieldCheck(input, errorEl, fn) {
  try {
    const v = fn(input.value);
    input.removeAttribute('aria-invalid');
    if (errorEl) errorEl.textContent = '';
    return v;
  } catch (e) {
    input.setAttribute('aria-invalid', 'true');
    if (errorEl) errorEl.textContent = e.message;
    input.focus();
    throw new FieldError(e.message);
  }
}

// --- the key locked in the wallet: the passphrase again, same account, same session ----

let unlockWaiters = [];

function setLocked(on) {
  state.locked = on;
  $('#locked').hidden = !on;
  document.body.dataset.locked = on ? '1' : '';
}

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
    toast('Your wallet is unlocked again.');
    refreshWallet();
  } catch (e) {
    if (e instanceof ApiError && e.code === 'no_session') {
      unlockDone(false);
      explain(e);
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
  if (unlocked === true && state.locked) { setLocked(false); unlockDone(true); }
}

async function checkSession() {
  if (!state.me) return;
  try {
    const me = await api('GET', '/api/session');
    if (state.me) { state.me = me; showUnlocked(me.unlocked); }
  } catch (e) {
    if (e instanceof ApiError && e.code === 'no_session') explain(e);
  }
}

// --- routing -------------------------------------------------------------------------------

const VIEWS = ['login', 'wallet', 'market', 'history', 'figures', 'agent'];

function show(view) {
  const changed = state.view !== view;
  state.view = view;
  for (const v of VIEWS) $(`#view-${v}`).hidden = v !== view;
  const inside = view !== 'login';
  $('#dock').hidden = !inside;
  $('#account-box').hidden = !inside;
  $('#settings').hidden = view !== 'wallet';
  for (const v of VIEWS.slice(1)) {
    const a = $(`#nav-${v}`);
    if (v === view) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  document.title = `gridtrade — ${view === 'login' ? 'log in' : $(`#nav-${view}`).textContent}`;
  if (changed && inside) $('#main').focus({ preventScroll: true });
}

function route() {
  if (!state.me) { show('login'); return; }
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1];
  const view = VIEWS.includes(name) && name !== 'login' ? name : 'wallet';
  show(view);
  if (view === 'market') { loadMarket(); loadOrders(); }
  if (view === 'wallet') { loadWallet(); loadHistory(); loadFigures(); }
  if (view === 'history') loadHistory();
  if (view === 'figures') { loadFigures(); loadMarket(); loadSiteFigures(); }
  if (view === 'agent') loadAgent();
}

// --- roles and units -----------------------------------------------------------------------

function setRole(role) {
  state.role = role === 'producer' ? 'producer' : 'consumer';
  document.body.dataset.role = state.role;
  for (const el of $$('[data-for]')) el.hidden = el.dataset.for !== state.role;
  $('#role-name').textContent = state.role;
  if (state.site) setOrdersMarket(state.site.auction_market, state.role);
}

function applyUnits() {
  for (const el of $$('.u-ether')) el.textContent = etherUnit();
  for (const el of $$('.u-energy')) el.textContent = energyUnit();
  for (const sel of ['#deposit-amount', '#withdraw-amount']) $(sel).placeholder = etherUnit();
  $('#unit-ether').value = prefs.ether;
  $('#unit-energy').value = prefs.energy;
  if (state.wallet) renderWallet(state.wallet);
  renderOffers();
  renderTrades();
  renderHistory();
  renderCharts();
  renderSiteFigures();
  renderTxs();
  renderAgent();
  renderOrders();
}

async function loadSite() {
  try {
    const site = await api('GET', '/api/site');
    state.site = site;
    state.clock = site.clock;
    state.clockSkew = site.clock.wall - Date.now() / 1000;
    $('#site-name').textContent = site.site;
    if (site.role) setRole(site.role);
    setOrdersMarket(site.auction_market, state.role);
  } catch (e) { /* the pages work without it */ }
}

// --- login / logout ------------------------------------------------------------------------

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
  $('#login-error').textContent = '';
  $('#login-note').hidden = true;
  if (!$('#passphrase').value) {
    $('#login-error').textContent = 'Enter the passphrase of this account.';
    $('#passphrase').focus();
    return;
  }
  btn.disabled = true;
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

async function loggedIn() {
  $('#who').textContent = short(state.me.address);
  $('#who').title = state.me.address;
  $('#site-name').textContent = state.me.site;
  showUnlocked(state.me.unlocked);
  await loadSite();
  connect();
  if (!location.hash || location.hash === '#/login') location.hash = '#/wallet';
  route();
}

// `note`: why (a deliberate logout is no error)
function loggedOut(note, isError = true) {
  state.me = null;
  setLocked(false);
  unlockDone(false);
  if (state.ws) { state.ws.onclose = null; state.ws.close(); state.ws = null; }
  setLive(false);
  state.offers.clear(); state.trades.clear(); state.txs.clear(); state.closing.clear();
  state.wallet = null; state.history = [];
  location.hash = '#/login';
  show('login');
  const n = $('#login-note');
  if (note && !isError) { n.textContent = note; n.hidden = false; } else n.hidden = true;
  if (note && isError) $('#login-error').textContent = note;
  loadAccounts();
}

async function logout() {
  await guarded($('#logout'), async () => {
    try { await api('DELETE', '/api/session'); } catch (e) { if (!(e instanceof ApiError && e.status === 401)) throw e; }
    loggedOut('You are logged out.', false);
  });
}

// --- wallet --------------------------------------------------------------------------------

let walletTimer = null;
function refreshWallet() { clearTimeout(walletTimer); walletTimer = setTimeout(loadWallet, 150); }

async function loadWallet() {
  if (!state.me) return;
  try {
    const w = await api('GET', '/api/wallet');
    if (!state.site || !state.site.role) setRole(w.tokens_wh > 0 || w.generated_wh > 0 ? 'producer' : 'consumer');
    renderWallet(w);
    for (const t of w.pending) track(t.tx_hash, { kind: t.kind, ref: t.ref, info: t });
    showUnlocked(w.unlocked);
  } catch (e) {
    explain(e);
  }
  loadMining();
}

function renderWallet(w) {
  const before = state.wallet;
  state.wallet = { ...(state.wallet || {}), ...w };
  w = state.wallet;
  amount($('#balance'), w.ether_wei);
  energy($('#tokens'), w.tokens_wh);
  energy($('#tokens-locked'), w.tokens_locked_wh);
  amount($('#credit'), w.credit_wei);
  $('#withdraw-credit').hidden = BigInt(w.credit_wei) === 0n;
  amount($('#escrow-free'), w.escrow_free_wei);
  amount($('#escrow-reserved'), w.escrow_reserved_wei || '0');
  amount($('#escrow-locked'), w.escrow_locked_wei);
  const until = Number(w.reserved_until || 0);
  const left = until - serverNow();
  $('#reserved-until').textContent = BigInt(w.escrow_reserved_wei || '0') > 0n && left > 0
    ? `until ${siteTime(simOf(until), false, true)} site time (${Math.ceil(left)} s from now)` : '';
  energy($('#market-tokens'), w.tokens_wh);
  amount($('#market-escrow'), w.escrow_free_wei);
  amount($('#market-reserved'), w.escrow_reserved_wei || '0');
  if (before && before.ether_wei != null && w.ether_wei != null) {
    const diff = BigInt(w.ether_wei) - BigInt(before.ether_wei);
    if (diff > 0n) {
      $('#balance-change').textContent = `+${etherText(diff.toString())}`;
      setTimeout(() => { $('#balance-change').textContent = ''; }, 6000);
    }
  }
}

// a `wallet.balances` frame: the balances changed (Ether received, a payment, a mint)
function onBalances(b) {
  const before = state.wallet;
  renderWallet(b);
  if (!before || before.ether_wei == null) return;
  const diff = BigInt(b.ether_wei) - BigInt(before.ether_wei);
  const ownWithdrawal = [...state.txs.values()].some((t) => ['withdraw', 'withdraw_credit'].includes(t.kind)
    && t.status === 'confirmed' && serverNow() - (t.doneAt || 0) < 30);
  if (diff > 0n && !ownWithdrawal) toast(`You received ${etherText(diff.toString())}.`);
}

async function loadMining() {
  try { showMining(await api('GET', '/api/mining')); } catch (e) { /* shown elsewhere */ }
}

function showMining(m) {
  $('#mining-state').textContent = m.supported ? (m.mining ? 'being mined' : 'not being mined (transactions wait)')
    : 'not known';
  $('#mining-state').dataset.mining = m.mining ? 'on' : 'off';
  state.miningOff = m.supported && !m.mining;
  $('#mining-detail').textContent = m.detail || '';
}

// --- transactions: from sent to confirmed ------------------------------------------------

const KIND_WORDS = {
  transfer: 'Sending Ether', deposit: 'Escrow deposit', withdraw: 'Escrow withdrawal',
  withdraw_credit: 'Withdrawing your earnings', approve: 'Letting the market lock your tokens for an offer',
  reserve: 'Reserving escrow for your bid',
};

function txWhat(t) {
  const base = t.what || KIND_WORDS[t.kind] || `Transaction (${t.kind || 'other'})`;
  if (t.what) return base;
  if (['deposit', 'withdraw', 'withdraw_credit'].includes(t.kind) && /^\d+$/.test(t.ref || '')) {
    return `${base} of ${etherText(t.ref)}`;
  }
  if (t.kind === 'approve' && /^\d+$/.test(t.ref || '')) return `${base} (${energyText(Number(t.ref))})`;
  return base;
}

function explorerLink(hash) {
  const url = state.site && state.site.explorer_tx_url;
  if (!url) return null;
  const a = document.createElement('a');
  a.href = url.replace('{hash}', hash);
  a.target = '_blank';
  a.rel = 'noopener';
  a.textContent = short(hash);
  a.className = 'hash';
  return a;
}

function whereText(t) {
  if (t.status === 'confirmed') return 'confirmed';
  if (t.status === 'failed') return `failed: ${t.reason || 'the chain refused it'}`;
  const i = t.info || {};
  if (i.state === 'replaced') return 'pending: sent again with a higher fee';
  if (i.state === 'mined') return i.depth_required ? `mined, ${i.depth ?? 0} of ${i.depth_required} confirmations` : 'mined';
  return state.miningOff ? 'pending: waiting for a block (mining is stopped)' : 'pending: waiting for a block';
}

// follow a transaction: `opts.statusEl` shows it under the form that sent it
function track(hash, opts = {}) {
  let t = state.txs.get(hash);
  if (!t) {
    t = { hash, status: 'pending', kind: opts.kind || '', ref: opts.ref || '', what: opts.what || '', at: serverNow() };
    state.txs.set(hash, t);
  }
  if (opts.statusEl) t.statusEl = opts.statusEl;
  if (opts.what) t.what = opts.what;
  if (opts.kind && !t.kind) t.kind = opts.kind;
  if (opts.ref && !t.ref) t.ref = opts.ref;
  if (opts.info) { t.info = opts.info; if (opts.info.status) t.status = opts.info.status; }
  if (opts.update) {
    const was = t.status;
    Object.assign(t, opts.update);
    if (was === 'pending' && t.status !== 'pending') finished(t);
  }
  renderTx(t);
  renderTxs();
  pollPending();
  return t;
}

function renderTx(t) {
  if (!t.statusEl) return;
  const el = t.statusEl;
  el.replaceChildren();
  el.dataset.state = t.status;
  el.dataset.hash = t.hash;
  el.append(document.createTextNode(`${txWhat(t)}: ${whereText(t)} `));
  el.append(explorerLink(t.hash) || Object.assign(document.createElement('span'),
    { className: 'hash', textContent: short(t.hash), title: t.hash }));
}

function finished(t) {
  t.doneAt = serverNow();
  if (t.status === 'confirmed') toast(`${txWhat(t)}: confirmed.`);
  else toast(`${txWhat(t)}: failed. ${t.reason || 'The chain refused it.'}`, { bad: true });
  refreshWallet();
  if (state.view === 'history' || state.view === 'wallet') setTimeout(loadHistory, 500);
}

function renderTxs() {
  const ul = $('#pending');
  const list = [...state.txs.values()].sort((a, b) => b.at - a.at).slice(0, 8);
  ul.replaceChildren(...list.map((t) => {
    const li = document.createElement('li');
    li.dataset.hash = t.hash;
    li.dataset.status = t.status;
    const what = document.createElement('span');
    what.className = 'what';
    what.textContent = txWhat(t);
    const where = document.createElement('span');
    where.className = 'where';
    where.textContent = ` · ${whereText(t)} · `;
    li.append(what, where, explorerLink(t.hash) || Object.assign(document.createElement('span'),
      { className: 'hash', textContent: t.hash }));
    return li;
  }));
  $('#pending-empty').hidden = state.txs.size > 0;
}

// while a transaction is open, its depth and replacements come from the wallet's list
let pendingTimer = null;
function pollPending() {
  if (pendingTimer || ![...state.txs.values()].some((t) => t.status === 'pending')) return;
  pendingTimer = setTimeout(async () => {
    pendingTimer = null;
    if (!state.me) return;
    try {
      const { txs } = await api('GET', '/api/pending');
      const open = new Set(txs.map((t) => t.tx_hash));
      for (const info of txs) {
        const t = state.txs.get(info.tx_hash);
        if (t) { t.info = info; renderTx(t); }
      }
      // gone from the list without an event seen (e.g. the page was offline): ask the wallet's view
      if ([...state.txs.values()].some((t) => t.status === 'pending' && !open.has(t.hash) && serverNow() - t.at > 20)) {
        loadHistory();
      }
      renderTxs();
    } catch (e) { /* next time */ }
    pollPending();
  }, 2500);
}

// --- wallet forms --------------------------------------------------------------------------

function amountForm(formSel, inputSel, statusSel, path, kind, words) {
  $(formSel).addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const input = $(inputSel);
    const st = $(statusSel);
    await guarded($(`${formSel} button[type=submit]`), async () => {
      const amount_wei = fieldCheck(input, st, (v) => parseEther(v));
      status(st, `${words(amount_wei)}: sending to your wallet…`, 'submitted');
      const r = await api('POST', path, { amount_wei });
      input.value = '';
      track(r.tx_hash, { kind, ref: amount_wei, what: words(amount_wei), statusEl: st });
    }, { statusEl: st });
  });
}

async function transfer(ev) {
  ev.preventDefault();
  const st = $('#transfer-status');
  await guarded($('#transfer-btn'), async () => {
    const to = fieldCheck($('#transfer-to'), $('#transfer-to-error'), checkAddress);
    const amount_wei = fieldCheck($('#transfer-amount'), $('#transfer-amount-error'), (v) => parseEther(v));
    const what = `Sending ${etherText(amount_wei)} to ${short(to)}`;
    status(st, `${what}: sending to your wallet…`, 'submitted');
    const r = await api('POST', '/api/transfers', { to, amount_wei });
    $('#transfer-amount').value = '';
    track(r.tx_hash, { kind: 'transfer', ref: to, what, statusEl: st });
  }, { statusEl: st });
}

// --- marketplace ---------------------------------------------------------------------------

async function loadMarket() {
  if (!state.me) return;
  try {
    const [offers, trades] = await Promise.all([api('GET', '/api/offers'), api('GET', '/api/trades')]);
    state.clockSkew = offers.now - Date.now() / 1000;
    const keep = [...state.offers.values()].filter((o) => o.endedAt);  // ending here: they leave on their own
    state.offers = new Map(offers.offers.map((o) => [o.offer_id, o]));
    for (const o of keep) if (!state.offers.has(o.offer_id)) state.offers.set(o.offer_id, o);
    state.trades = new Map(trades.trades.map((t) => [t.trade_id, { ...(state.trades.get(t.trade_id) || {}), ...t }]));
    renderOffers();
    renderTrades();
  } catch (e) {
    explain(e);
  }
  loadPrices();
  refreshWallet();
}

let marketTimer = null;
function refreshMarket() { clearTimeout(marketTimer); marketTimer = setTimeout(loadMarket, 200); }

const increment = () => BigInt((state.site && state.site.min_increment_wei_per_kwh) || '1');
const nextBid = (o) => (o.highest_bid_wei_per_kwh == null ? BigInt(o.start_price_wei_per_kwh)
  : BigInt(o.highest_bid_wei_per_kwh) + increment());

const OUTCOME = { sold: 'sold', expired: 'expired without bids', cancelled: 'cancelled by its seller', filled: 'filled' };

function renderOffers() {
  const box = $('#offers');
  // the double auction's sell orders are in its own panel's order book, not offers to bid on
  const list = [...state.offers.values()].filter((o) => o.market !== 'double' && (o.state === 'open' || o.endedAt))
    .sort((a, b) => a.ends_at - b.ends_at);
  const cards = list.map((o) => {
    let card = box.querySelector(`[data-offer="${CSS.escape(o.offer_id)}"]`);
    if (!card) {
      card = $('#offer-card').content.firstElementChild.cloneNode(true);
      card.dataset.offer = o.offer_id;
      const input = card.querySelector('.bid-price');
      input.id = `bid-${o.offer_id}`;
      card.querySelector('.bid-form label').htmlFor = input.id;
      card.querySelector('.bid-form').addEventListener('submit', (ev) => bid(ev, o.offer_id, card));
      card.querySelector('.cancel-btn').addEventListener('click', (ev) => cancelOffer(o.offer_id, ev.target, card));
      input.addEventListener('input', () => { delete card.dataset.confirmSelf; card.querySelector('.warn').hidden = true; });
    }
    const own = mine(o.seller);
    card.classList.toggle('mine', own);
    card.classList.toggle('ended', o.state !== 'open');
    card.dataset.state = o.state;
    card.dataset.endsAt = o.ends_at;
    card.querySelector('.kwh').textContent = fmtEnergy(o.wh);
    for (const u of card.querySelectorAll('.u-energy')) u.textContent = energyUnit();
    for (const u of card.querySelectorAll('.u-ether')) u.textContent = etherUnit();
    card.querySelector('.seller').textContent = own ? 'you' : short(o.seller);
    card.querySelector('.seller').title = o.seller;
    card.querySelector('.site').textContent = o.seller_site;
    card.querySelector('.yours').hidden = !own;
    amount(card.querySelector('.start'), o.start_price_wei_per_kwh, { price: true, unit: true });
    const hi = card.querySelector('.highest');
    if (o.highest_bid_wei_per_kwh != null) amount(hi, o.highest_bid_wei_per_kwh, { price: true, unit: true });
    else { hi.textContent = 'none yet'; delete hi.dataset.wei; }
    card.querySelector('.bidder').textContent = o.highest_bidder
      ? (mine(o.highest_bidder) ? 'by you' : `by ${short(o.highest_bidder)}`) : '';
    const next = nextBid(o);
    const nextEl = card.querySelector('.next');
    nextEl.textContent = o.state !== 'open' ? '' : (o.highest_bid_wei_per_kwh == null
      ? `Next bid: at least ${priceText(next)} (the start bid).`
      : `Next bid: at least ${priceText(next)}: the highest bid plus the minimum increment of `
        + `${exactEther(increment())} ${etherUnit()}/kWh.`);
    nextEl.dataset.wei = next.toString();
    const input = card.querySelector('.bid-price');
    input.placeholder = `at least ${fmtEther(next, 3)}`;
    card.querySelector('.bid-form').hidden = own || o.state !== 'open';
    card.querySelector('.cancel-btn').hidden = !(own && o.state === 'open' && !o.bids);
    if (o.state !== 'open') {
      const how = o.state === 'sold' && o.winner
        ? `sold to ${mine(o.winner) ? 'you' : short(o.winner)}${o.price_wei_per_kwh ? ` at ${priceText(o.price_wei_per_kwh)}` : ''}`
        : OUTCOME[o.state] || o.state;
      card.querySelector('.countdown-line').textContent = `Ended: ${how}.`;
    }
    return card;
  });
  if (cards.length) box.replaceChildren(...cards); else box.innerHTML = '<p class="sub empty">No open offers right now.</p>';
  tick();
}

function tick() {
  const now = serverNow();
  for (const card of $$('#offers [data-offer]')) {
    if (card.dataset.state !== 'open') continue;
    const left = Number(card.dataset.endsAt) - now;
    const cd = card.querySelector('.countdown');
    if (cd) cd.textContent = countdown(left);
    card.querySelector('.bid-btn').disabled = left <= 0;
  }
}

async function sell(ev) {
  ev.preventDefault();
  const st = $('#sell-status');
  await guarded($('#sell-btn'), async () => {
    const wh = fieldCheck($('#sell-kwh'), st, parseEnergy);
    const price = fieldCheck($('#sell-price'), st, (v) => parseEther(v, 'the start bid'));
    const duration = fieldCheck($('#sell-duration'), st, (v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1) throw new Error('The auction runs for a whole number of seconds, at least 1.');
      return n;
    });
    status(st, `Putting ${energyText(wh)} on the market…`, 'submitted');
    const body = { kwh: fmtEnergyKwh(wh), start_price_wei_per_kwh: price, duration_s: duration };
    const r = await api('POST', '/api/offers', body);
    status(st, `Your offer of ${energyText(r.wh)} is on the market until the countdown ends.`, 'done');
    toast(`Your offer of ${energyText(r.wh)} is on the market.`);
    $('#sell-kwh').value = '';
    refreshMarket();
  }, { statusEl: st });
}

const fmtEnergyKwh = (wh) => `${Math.floor(wh / 1000)}.${String(wh % 1000).padStart(3, '0')}`.replace(/\.?0+$/, '');

async function bid(ev, offerId, card) {
  ev.preventDefault();
  const input = card.querySelector('.bid-price');
  const st = card.querySelector('.tx-status');
  const warn = card.querySelector('.warn');
  const o = state.offers.get(offerId);
  await guarded(card.querySelector('.bid-btn'), async () => {
    const price = fieldCheck(input, st, (v) => parseEther(v, 'your bid'));
    if (o && mine(o.highest_bidder) && card.dataset.confirmSelf !== '1') {
      warn.textContent = `You are already the highest bidder at ${priceText(o.highest_bid_wei_per_kwh)}: a new bid `
        + `raises the price you pay. Press “Raise my bid” to bid ${priceText(price)} anyway.`;
      warn.hidden = false;
      card.dataset.confirmSelf = '1';
      card.querySelector('.bid-btn').textContent = 'Raise my bid';
      return;
    }
    status(st, `Placing your bid of ${priceText(price)}…`, 'submitted');
    await api('POST', `/api/offers/${encodeURIComponent(offerId)}/bids`, { price_wei_per_kwh: price });
    input.value = '';
    warn.hidden = true;
    delete card.dataset.confirmSelf;
    card.querySelector('.bid-btn').textContent = 'Bid';
    status(st, `Your bid of ${priceText(price)} is the highest now.`, 'done');
    toast(`Your bid of ${priceText(price)} is in.`);
  }, { statusEl: st, ctx: { input } });
}

async function cancelOffer(offerId, button, card) {
  const st = card.querySelector('.tx-status');
  await guarded(button, async () => {
    status(st, 'Cancelling your offer…', 'submitted');
    await api('POST', `/api/offers/${encodeURIComponent(offerId)}/cancel`, {});
    status(st, 'Your offer is cancelled.', 'done');
    toast('Your offer is cancelled.');
  }, { statusEl: st });
}

function offerEnded(b) {
  const o = state.offers.get(b.offer_id);
  if (!o) return;
  Object.assign(o, { state: b.outcome, winner: b.winner, price_wei_per_kwh: b.price_wei_per_kwh, endedAt: serverNow() });
  renderOffers();
  // an ended offer says how it ended, then leaves the list
  setTimeout(() => { state.offers.delete(b.offer_id); renderOffers(); }, 6000);
}

// --- trades: each card tells its story ---------------------------------------------------

const STATE_WORDS = {
  [TradeState.AGREED]: 'opening on the chain', [TradeState.RECORDED]: 'delivering',
  [TradeState.DELIVERING]: 'delivering', [TradeState.FULFILLED]: 'all delivered', [TradeState.CLOSED]: 'closed',
  [TradeState.SETTLED]: 'settled', [TradeState.FAILED]: 'failed',
};

export function closedBy(reason, st) {
  const low = (reason || '').toLowerCase();
  for (const who of ['buyer', 'seller', 'operator']) if (low.includes(`by the ${who}`) || low.includes(`by its ${who}`)) return who;
  if (low.includes('mismatch')) return 'mismatch';
  if (low.includes('on chain') || low.includes('deadline')) return 'chain';
  return st === TradeState.FULFILLED ? 'delivered' : '';
}

function story(t) {
  if (t.state === TradeState.FAILED) return `Could not be opened on the chain: ${t.close_reason || t.reason || 'no reason given'}.`;
  const who = t.closed_by || closedBy(t.close_reason || t.reason, t.state);
  const at = t.closed_at ? ` at ${siteTime(simOf(t.closed_at))} site time` : '';
  const youBuy = mine(t.buyer);
  const youSell = mine(t.seller);
  const words = {
    buyer: youBuy ? 'You closed it' : 'The buyer closed it',
    seller: youSell ? 'You closed it' : 'The seller closed it',
    operator: 'The market closed it', chain: 'Closed on the chain (its time was up)',
    mismatch: 'Closed because the two meters disagreed', delivered: 'All of it was delivered',
  }[who];
  if (words) return `${words}${at}.`;
  if (OPEN.has(t.state)) {
    const started = t.agreed_at ? `Agreed at ${siteTime(simOf(t.agreed_at))} site time. ` : '';
    return `${started}${youBuy ? 'Energy flows to you while it runs; Close Connection ends it.' : 'Energy flows while it runs.'}`;
  }
  return '';
}

function renderTrades() {
  const box = $('#trades');
  const list = [...state.trades.values()].sort((a, b) => (b.agreed_at || 0) - (a.agreed_at || 0)
    || (a.trade_id < b.trade_id ? 1 : -1));
  const cards = list.map((t) => {
    let card = box.querySelector(`[data-trade="${CSS.escape(t.trade_id)}"]`);
    if (!card) {
      card = $('#trade-card').content.firstElementChild.cloneNode(true);
      card.dataset.trade = t.trade_id;
      card.querySelector('.close-btn').addEventListener('click', (e) => closeTrade(t.trade_id, e.target));
    }
    const youBuy = mine(t.buyer);
    const youSell = mine(t.seller);
    const closing = state.closing.has(t.trade_id);
    card.classList.toggle('mine', youBuy || youSell);
    card.classList.toggle('ended', !OPEN.has(t.state) && !closing);
    card.dataset.state = t.state;
    card.dataset.closing = closing ? '1' : '';
    card.querySelector('.kwh').textContent = fmtEnergy(t.wh);
    for (const u of card.querySelectorAll('.u-energy')) u.textContent = energyUnit();
    card.querySelector('.parties').textContent = youBuy ? `you buy from ${t.seller_site}`
      : youSell ? `you sell to ${t.buyer_site}` : `${t.seller_site} → ${t.buyer_site}`;
    card.querySelector('.state').textContent = closing ? 'closing…' : (STATE_WORDS[t.state] || t.state);
    amount(card.querySelector('.price'), t.price_wei_per_kwh, { price: true, unit: true });
    const delivered = Math.min(t.delivered_wh || 0, t.wh);
    const dl = card.querySelector('.delivered-line');
    dl.textContent = `delivered ${fmtEnergy(delivered)} of ${energyText(t.wh)}`;
    dl.dataset.wh = String(t.delivered_wh || 0);
    const prog = card.querySelector('.progress');
    prog.value = t.wh ? delivered / t.wh : 0;
    prog.setAttribute('aria-label', `${Math.round(100 * prog.value)}% delivered`);
    const money = card.querySelector('.money');
    const cost = costWei(t.wh, t.price_wei_per_kwh);
    money.replaceChildren();
    const paid = document.createElement('strong');
    paid.className = 'paid';
    amount(paid, t.paid_wei || '0', { unit: true });
    money.append(document.createTextNode(youBuy ? 'you paid ' : youSell ? 'you earned ' : 'paid '), paid);
    if (t.refunded_wei != null) {
      const r = document.createElement('span');
      r.className = 'refunded';
      amount(r, t.refunded_wei, { unit: true });
      money.append(document.createTextNode(youBuy ? ' · refunded to your escrow ' : ' · refunded to the buyer '), r);
    } else if (OPEN.has(t.state)) {
      const c = document.createElement('span');
      c.className = 'locked-cost';
      amount(c, cost.toString(), { unit: true });
      money.append(document.createTextNode(' of '), c, document.createTextNode(' locked in escrow'));
    }
    card.querySelector('.story').textContent = closing
      ? 'Closing: the relays open, then the last part is settled and the rest of the escrow freed.' : story(t);
    const flag = card.querySelector('.flag');
    const mm = t.mismatch;
    if (mm) {
      flag.textContent = `The two meters disagree: the buyer's counted ${energyText(mm.buyer_wh)}, the seller's `
        + `${energyText(mm.seller_wh)} (more than the ${Math.round(mm.tolerance * 100)}% allowed).`
        + (mm.reason ? ` ${mm.reason}` : '');
      flag.hidden = false;
    } else flag.hidden = true;
    const btn = card.querySelector('.close-btn');
    btn.hidden = !(youBuy && (OPEN.has(t.state) || closing));
    btn.disabled = closing;
    btn.textContent = closing ? 'Closing…' : 'Close Connection';
    return card;
  });
  if (cards.length) box.replaceChildren(...cards); else box.innerHTML = '<p class="sub empty">No trades yet.</p>';
}

async function closeTrade(tradeId, button) {
  state.closing.add(tradeId);
  renderTrades();
  const ok = await guarded(button, async () => {
    await api('POST', `/api/trades/${encodeURIComponent(tradeId)}/close`, {});
    return true;
  });
  if (!ok) { state.closing.delete(tradeId); renderTrades(); return; }
  // the relays open within a few readings; if no word of it comes, the settlement ends "closing…"
  setTimeout(() => { if (state.closing.delete(tradeId)) renderTrades(); }, 60000);
}

function closedNow(tradeId, words) {
  if (!state.closing.delete(tradeId)) return;
  renderTrades();
  toast(words);
}

// --- history ---------------------------------------------------------------------------------

const WHAT = {
  bought: 'you bought', sold: 'you sold', offer: 'your offer', sent: 'you sent Ether', received: 'you received Ether',
  deposit: 'escrow deposit', withdraw: 'escrow withdrawal', withdraw_credit: 'earnings withdrawn',
};

let historyTimer = null;
async function loadHistory() {
  clearTimeout(historyTimer);
  if (!state.me) return;
  try {
    const h = await api('GET', '/api/history');
    state.history = h.rows;
    renderHistory();
  } catch (e) { explain(e); }
}
function refreshHistory() { clearTimeout(historyTimer); historyTimer = setTimeout(loadHistory, 800); }

function cell(tr, label, content, cls = '') {
  const td = document.createElement('td');
  td.dataset.label = label;
  if (cls) td.className = cls;
  if (content instanceof Node) td.append(content); else td.textContent = content ?? '';
  tr.append(td);
  return td;
}

function renderHistory() {
  const body = $('#history tbody');
  const rows = state.history || [];
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement('tr');
    tr.dataset.kind = r.kind;
    tr.dataset.id = r.id;
    const time = cell(tr, 'Time', siteTime(r.sim_at, true), 'time');
    time.title = `${new Date((r.at || 0) * 1000).toISOString().replace('.000', '')} (wall clock, UTC)`;
    cell(tr, 'What', WHAT[r.kind] || r.kind, 'what');
    const who = cell(tr, 'With', r.counterparty ? `${short(r.counterparty)}${r.counterparty_site ? ` (${r.counterparty_site})` : ''}` : '—', 'with');
    if (r.counterparty) who.title = r.counterparty;
    const en = r.wh == null ? '—' : (['bought', 'sold'].includes(r.kind)
      ? `${fmtEnergy(r.delivered_wh)} of ${energyText(r.wh)}` : energyText(r.wh));
    const e = cell(tr, 'Energy', en, 'energy num');
    if (r.wh != null) { e.dataset.wh = String(r.wh); e.dataset.deliveredWh = String(r.delivered_wh ?? ''); }
    const p = cell(tr, 'Price', '', 'price num');
    if (r.price_wei_per_kwh != null) amount(p, r.price_wei_per_kwh, { price: true, unit: true }); else p.textContent = '—';
    const a = cell(tr, 'Amount', '', 'amount num');
    if (r.amount_wei != null) {
      const s = document.createElement('span');
      amount(s, r.amount_wei, { unit: true });
      a.append(s);
      a.dataset.wei = r.amount_wei;
      if (r.refunded_wei != null && BigInt(r.refunded_wei) > 0n) {
        a.append(document.createTextNode(` (refunded ${etherText(r.refunded_wei)})`));
      }
    } else a.textContent = '—';
    cell(tr, 'Status', `${r.status}${r.detail ? `: ${r.detail}` : ''}`, 'status');
    return tr;
  }));
  $('#history-empty').hidden = rows.length > 0;
  // Your transactions: the recent ones the history knows, also after a reload (no notice for those)
  let added = false;
  for (const r of rows.slice(0, 20)) {
    if (!['sent', 'deposit', 'withdraw', 'withdraw_credit'].includes(r.kind) || r.status === 'pending') continue;
    // open ones come from the wallet's own list, with their depth
    const known = state.txs.get(r.id);
    if (known) {  // followed here, and its end was never heard (an event lost, the page offline): the history's word
      if (known.status === 'pending') {
        track(r.id, { update: { status: r.status, reason: r.status === 'failed' ? r.detail : '' } });
      }
      continue;
    }
    const kind = r.kind === 'sent' ? 'transfer' : r.kind;
    const what = r.kind === 'sent' && r.amount_wei ? `Sending ${etherText(r.amount_wei)} to ${short(r.counterparty)}` : '';
    state.txs.set(r.id, { hash: r.id, status: r.status, kind, ref: r.amount_wei || '', what, at: r.at || 0,
      reason: r.status === 'failed' ? r.detail : '' });
    added = true;
  }
  if (added) { renderTxs(); pollPending(); }
  // the wallet's summaries come from the same rows
  let paid = 0n; let refunded = 0n; let bought = 0; let earned = 0n; let n = 0;
  for (const r of rows) {
    if (r.kind === 'bought') { paid += BigInt(r.amount_wei || '0'); refunded += BigInt(r.refunded_wei || '0'); bought += r.delivered_wh || 0; n += 1; }
    if (r.kind === 'sold') earned += BigInt(r.amount_wei || '0');
  }
  amount($('#bills-total'), paid.toString());
  amount($('#bills-refunded'), refunded.toString());
  energy($('#bills-energy'), bought);
  $('#bills-count').textContent = String(n);
  amount($('#earned-total'), earned.toString());
}

// --- figures -----------------------------------------------------------------------------------

async function loadFigures() {
  if (!state.me) return;
  try {
    const r = await api('GET', '/api/readings');
    state.readings = r.readings;
    state.clock = r.clock;
    state.clockSkew = r.clock.wall - Date.now() / 1000;
  } catch (e) { explain(e); }
  renderFigures();
  renderCharts();
}

async function loadPrices() {
  try {
    const r = await api('GET', '/api/prices');
    state.prices = r.points;
    renderCharts();
  } catch (e) { /* the chart says nothing yet */ }
}

function renderFigures() {
  const last = state.readings[state.readings.length - 1];
  const latest = (role) => [...state.readings].reverse().find((x) => x.role === role);
  const gen = last && (last.pv_w != null ? last.pv_w : (latest('producer') || {}).power_w);
  const load = last && (last.load_w != null ? last.load_w : (latest('consumer') || {}).power_w);
  $('#fig-gen').textContent = kw(gen);
  $('#fig-load').textContent = kw(load);
  $('#fig-soc').textContent = last && last.soc != null ? Math.round(last.soc * 100) : '–';
  energy($('#fig-energy'), last ? last.energy_wh : null);
  $('#fig-energy-what').textContent = last ? (last.role === 'producer' ? 'energy into the batteries, all time'
    : 'energy in from the line, all time') : '';
  $('#power-now').textContent = kw(state.role === 'producer' ? gen : load);
  energy($('#energy-total'), last ? last.energy_wh : null);
  $('#clock-note').textContent = state.clock.simulated
    ? `This site is simulated: its clock runs ${state.clock.scale}× faster than real time; charts and history use its time (${siteTime(simOf(serverNow()), true)} now).`
    : 'Times are the site\'s (this browser\'s) time.';
}

// --- the site's figures per day of site time ------------------------------------------------

// days start at midnight of this browser's time zone, as the site's times are shown
function tzOffset() {
  const at = state.clock && state.clock.sim ? state.clock.sim * 1000 : Date.now();
  const o = -new Date(at).getTimezoneOffset() * 60;
  return o % 900 === 0 && Math.abs(o) <= 14 * 3600 ? o : 0;
}

function figuresQuery() {
  const r = state.figRange;
  return `?${r ? `from=${r.from}&to=${r.to}&` : ''}tz_offset_s=${tzOffset()}`;
}

async function loadSiteFigures() {
  if (!state.me) return;
  const q = figuresQuery();
  try {
    state.figures = await api('GET', '/api/figures' + q);
    $('#figures-status').textContent = '';
  } catch (e) {
    $('#figures-status').textContent = e.message;
    return;
  }
  $('#figures-csv').href = '/api/figures.csv' + q;
  renderSiteFigures();
}

// a date typed in a date field -> the site's time of that day's midnight (this browser's zone)
function dayStart(value) {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(value || '');
  return m ? new Date(Number(m[1]), Number(m[2]) - 1, Number(m[3])).getTime() / 1000 : null;
}

function showRange(ev) {
  ev.preventDefault();
  const from = dayStart($('#figures-from').value);
  const to = dayStart($('#figures-to').value || $('#figures-from').value);
  if (from == null || to == null) { $('#figures-status').textContent = 'Choose the first and the last day to show.'; return; }
  if (to < from) { $('#figures-status').textContent = 'The last day comes before the first: choose them again.'; return; }
  state.figRange = { from, to: to + 86400 };
  loadSiteFigures();
}

function showToday() {
  state.figRange = null;
  $('#figures-from').value = '';
  $('#figures-to').value = '';
  loadSiteFigures();
}

function renderSiteFigures() {
  const f = state.figures;
  if (!f) return;
  const t = f.total;
  const days = f.days;
  const first = days[0] ? days[0].day : '';
  const last = days.length ? days[days.length - 1].day : '';
  $('#figures-day').textContent = days.length === 1 ? `${first}${state.figRange ? '' : ' (today, site time)'}`
    : `${first} to ${last} (${days.length} days)`;
  if (!$('#figures-from').value) $('#figures-from').value = first;
  if (!$('#figures-to').value) $('#figures-to').value = last;
  energy($('#ft-produced'), t.produced_wh);
  energy($('#ft-consumed'), t.consumed_wh);
  energy($('#ft-bought'), t.bought_local_wh);
  energy($('#ft-sold'), t.sold_local_wh);
  energy($('#ft-bought-utility'), t.bought_utility_wh);
  energy($('#ft-sold-utility'), t.sold_utility_wh);
  energy($('#ft-unmatched-import'), t.unmatched_import_wh);
  energy($('#ft-unmatched-export'), t.unmatched_export_wh);
  amount($('#ft-bought-wei'), t.bought_local_wei);
  amount($('#ft-sold-wei'), t.sold_local_wei);
  amount($('#ft-bought-utility-wei'), t.bought_utility_wei);
  amount($('#ft-sold-utility-wei'), t.sold_utility_wei);
  amount($('#ft-saved'), t.saved_wei);
  $('#ft-self').textContent = t.self_sufficiency == null ? '– (nothing consumed)' : `${Math.round(t.self_sufficiency * 100)} %`;
  $('#ft-retail').textContent = priceText(f.tariffs.retail_wei_per_kwh);
  $('#ft-feed-in').textContent = priceText(f.tariffs.feed_in_wei_per_kwh);
  renderDayCharts();
}

function renderDayCharts() {
  const f = state.figures;
  const visible = (id) => { const c = $(id); return c && c.offsetParent !== null ? c : null; };
  if (!f) return;
  const mid = (d) => (d.start + d.end) / 2;
  const per = energyUnit() === 'kWh' ? 1000 : 1;
  const e = (wh) => wh / per;
  const days = f.days;
  const width = Math.max(...days.map((d) => d.end - d.start)) * 0.8;
  const box = visible('#chart-days');
  if (box) {
    const series = [
      ['produced', '#2c7a3f', (d) => d.produced_wh],
      ['consumed', '#b3401b', (d) => d.consumed_wh],
      ['traded locally', '#2a62b0', (d) => d.bought_local_wh + d.sold_local_wh],
      ['with the utility', '#6b6b6b', (d) => d.bought_utility_wh + d.sold_utility_wh],
      ['unmatched', '#a3a3a3', (d) => d.unmatched_import_wh + d.unmatched_export_wh],
    ].map(([label, color, get]) => ({ label, color, kind: 'bars',
      points: days.map((d) => [mid(d), e(get(d)), `${d.day}: ${label} ${energyText(get(d))}`]) }));
    const t = f.total;
    draw(box, { title: 'Energy per day', yLabel: energyUnit(), minSpan: 86400 * 1.5, barWidth: width, series,
      xLabel: 'site day',
      summary: `In all: produced ${energyText(t.produced_wh)}, consumed ${energyText(t.consumed_wh)}, bought locally `
        + `${energyText(t.bought_local_wh)}, sold locally ${energyText(t.sold_local_wh)}, bought from the utility `
        + `${energyText(t.bought_utility_wh)}, sold to the utility ${energyText(t.sold_utility_wh)}, unmatched `
        + `${energyText(t.unmatched_import_wh)} in and ${energyText(t.unmatched_export_wh)} out.` });
  }
  const selfBox = visible('#chart-self');
  if (selfBox) {
    const pts = days.filter((d) => d.self_sufficiency != null)
      .map((d) => [mid(d), Math.round(d.self_sufficiency * 1000) / 10, `${d.day}: ${Math.round(d.self_sufficiency * 100)} %`]);
    draw(selfBox, { title: 'Self-sufficiency', yLabel: '%', minSpan: 86400 * 1.5, barWidth: width / 2, xLabel: 'site day',
      series: [{ label: 'self-sufficiency (%)', color: '#2c7a3f', kind: 'bars', points: pts }],
      empty: 'Nothing consumed in these days yet.',
      summary: f.total.self_sufficiency == null ? '' : `In all: ${Math.round(f.total.self_sufficiency * 100)} %.` });
  }
  const savedBox = visible('#chart-saved');
  if (savedBox) {
    const pts = days.map((d) => [mid(d), Number(exactEther(d.saved_wei)), `${d.day}: saved ${etherText(d.saved_wei)}`]);
    draw(savedBox, { title: 'Saved', yLabel: etherUnit(), minSpan: 86400 * 1.5, barWidth: width / 2, xLabel: 'site day',
      series: [{ label: `saved against the utility (${etherUnit()})`, color: '#9a6a00', kind: 'bars', points: pts }],
      summary: `In all: ${etherText(f.total.saved_wei)} saved.` });
  }
}

let chartTimer = null;
function renderChartsSoon() { if (!chartTimer) chartTimer = setTimeout(() => { chartTimer = null; renderCharts(); }, 1000); }

let siteFiguresTimer = null;
function refreshSiteFigures() {
  if (!siteFiguresTimer) siteFiguresTimer = setTimeout(() => { siteFiguresTimer = null; loadSiteFigures(); }, 1000);
}

function renderCharts() {
  renderDayCharts();
  const visible = (id) => { const c = $(id); return c && c.offsetParent !== null ? c : null; };
  const energyBox = visible('#chart-energy');
  if (energyBox) {
    const rs = state.readings;
    const gen = rs.map((r) => [r.sim_at, r.pv_w != null ? r.pv_w / 1000 : (r.role === 'producer' ? r.power_w / 1000 : null)]);
    const use = rs.map((r) => [r.sim_at, r.load_w != null ? r.load_w / 1000 : (r.role === 'consumer' ? r.power_w / 1000 : null)]);
    const spans = [];
    let open = null;
    for (const r of rs) {
      if (r.relay_closed && open == null) open = r.sim_at;
      if (!r.relay_closed && open != null) { spans.push({ from: open, to: r.sim_at, label: 'relay closed: a trade ran' }); open = null; }
    }
    if (open != null) spans.push({ from: open, to: null, label: 'relay closed: a trade runs' });
    const first = rs.length ? rs[0].sim_at : null;
    const markers = [...state.trades.values()].filter((t) => t.agreed_at && (mine(t.buyer) || mine(t.seller)))
      .map((t) => ({ t: t.sim_agreed_at || simOf(t.agreed_at), label: `trade ${t.trade_id}: ${energyText(t.wh)} at ${priceText(t.price_wei_per_kwh)}` }))
      .filter((m) => first == null || m.t >= first);
    const last = rs[rs.length - 1];
    draw(energyBox, {
      title: 'Generation and consumption', yLabel: 'kW', minSpan: 7200, spans, markers, spanLabel: 'trade running (relay closed)',
      series: [{ label: 'generation (kW)', color: '#2c7a3f', points: gen }, { label: 'consumption (kW)', color: '#b3401b', points: use }],
      empty: 'No meter readings yet.',
      summary: last ? `Now: generation ${kw(gen[gen.length - 1][1] * 1000)} kW, consumption ${kw(use[use.length - 1][1] * 1000)} kW.` : '',
    });
  }
  for (const id of ['#chart-price', '#chart-price-big']) {
    const box = visible(id);
    if (!box) continue;
    const pts = (kind) => state.prices.filter((p) => p.kind === kind)
      .map((p) => [p.sim_at ?? simOf(p.at), Number(exactEther(p.price_wei_per_kwh)), `${kind} ${priceText(p.price_wei_per_kwh)}`]);
    const trades = state.prices.filter((p) => p.kind === 'trade');
    const last = trades[trades.length - 1];
    draw(box, {
      title: 'Market prices', yLabel: `${etherUnit()}/kWh`, minSpan: 3600,
      series: [
        { label: 'start bids', color: '#5b6b61', kind: 'dots', size: 3, points: pts('start'), cls: 'start' },
        { label: 'bids', color: '#2a62b0', kind: 'dots', points: pts('bid'), cls: 'bid' },
        { label: 'trades', color: '#9a6a00', kind: 'dots', size: 6, points: pts('trade'), cls: 'trade' },
        { label: 'clearing prices', color: '#6d3fa0', kind: 'dots', size: 5, points: pts('clear'), cls: 'clear' },
      ].filter((s) => s.points.length || s.cls === 'bid' || s.cls === 'trade'),
      markers: trades.map((p) => ({ t: p.sim_at ?? simOf(p.at), label: `trade at ${priceText(p.price_wei_per_kwh)}` })),
      empty: 'No bids or trades yet: prices appear here as they happen.',
      summary: last ? `Last trade: ${priceText(last.price_wei_per_kwh)}.` : '',
    });
  }
}

// --- the live feed ---------------------------------------------------------------------------

function setLive(on) {
  const el = $('#live');
  el.textContent = on ? 'live' : 'offline';
  el.classList.toggle('on', on);
}

function connect() {
  if (state.ws || !state.me) return;
  const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/api/ws`);
  state.ws = ws;
  ws.onopen = () => {
    setLive(true);
    // back after a gap (a restart, or closed for being too slow): news of open transactions may be lost
    if (state.wsRetry > 0 && [...state.txs.values()].some((t) => t.status === 'pending')) loadHistory();
    state.wsRetry = 0;
  };
  ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (e) { console.warn('bad event', e); } };
  ws.onclose = (ev) => {
    state.ws = null;
    setLive(false);
    if (ev.code === 4401) { if (state.me) loggedOut('Your session has ended. Please log in again.'); return; }
    if (!state.me) return;
    const delay = Math.min(10000, 500 * 2 ** state.wsRetry++);
    setTimeout(() => { connect(); if (state.me) route(); }, delay);
  };
}

function addPrice(kind, ts, wei, ref) {
  state.prices.push({ at: ts, sim_at: simOf(ts), kind, price_wei_per_kwh: wei, ref });
  if (state.prices.length > 1000) state.prices.shift();
  renderChartsSoon();
}

function onEvent(msg) {
  const b = msg.body;
  switch (msg.type) {
    case 'hello':
      document.body.dataset.live = '1';
      break;
    case 'wallet.balances':
      onBalances(b);
      break;
    case 'market.offer_opened':
      state.offers.set(b.offer_id, { ...b, state: 'open', highest_bid_wei_per_kwh: null, highest_bidder: null, bids: 0 });
      addPrice('start', msg.ts, b.start_price_wei_per_kwh, b.offer_id);
      renderOffers();
      break;
    case 'market.bid_placed': {
      const o = state.offers.get(b.offer_id);
      if (o) {
        const outbid = mine(o.highest_bidder) && !mine(b.buyer);
        o.highest_bid_wei_per_kwh = b.price_wei_per_kwh; o.highest_bidder = b.buyer; o.bids = (o.bids || 0) + 1;
        renderOffers();
        if (outbid) toast(`You were outbid: the highest bid is ${priceText(b.price_wei_per_kwh)} now.`);
      }
      addPrice('bid', msg.ts, b.price_wei_per_kwh, b.offer_id);
      break;
    }
    case 'market.offer_closed':
      offerEnded(b);
      if (b.outcome === 'sold' && mine(b.winner)) toast(`You won the auction at ${priceText(b.price_wei_per_kwh)}: the trade opens on the chain.`);
      break;
    case 'market.cleared':
      if (b.price_wei_per_kwh != null) addPrice('clear', msg.ts, b.price_wei_per_kwh, `round ${b.round}`);
      onOrdersEvent(msg.type);
      break;
    case 'market.order_placed':
      onOrdersEvent(msg.type);
      break;
    case 'trade.agreed':
    case 'trade.status': {
      const t = state.trades.get(b.trade_id) || { paid_wei: '0', delivered_wh: 0, state: TradeState.AGREED };
      const was = t.state;
      Object.assign(t, b);
      if (msg.type === 'trade.agreed') {
        t.state = was || TradeState.AGREED;
        t.agreed_at = t.agreed_at || msg.ts;
        t.sim_agreed_at = simOf(t.agreed_at);
        addPrice('trade', msg.ts, b.price_wei_per_kwh, b.trade_id);
      }
      if ([TradeState.CLOSED, TradeState.FULFILLED, TradeState.FAILED].includes(b.state) && !t.closed_at) {
        t.closed_at = msg.ts;
        t.close_reason = b.reason || (b.state === TradeState.FULFILLED ? 'all delivered' : '');
        t.closed_by = closedBy(t.close_reason, b.state);
      }
      state.trades.set(b.trade_id, t);
      if (b.state === TradeState.SETTLED) closedNow(b.trade_id, 'The trade is settled: the relays are open and the unspent escrow is free again.');
      renderTrades();
      refreshWallet();
      if (mine(b.buyer) || mine(b.seller)) refreshHistory();
      break;
    }
    case 'meter.relay':
      if (!b.closed && b.trade_id && state.closing.has(b.trade_id)) {
        closedNow(b.trade_id, 'Connection closed: the relays are open; the last part is settled and the rest of your escrow freed.');
      }
      break;
    case 'meter.mismatch': {
      const t = state.trades.get(b.trade_id);
      if (t) { t.mismatch = b; renderTrades(); }
      break;
    }
    case 'chain.settled':
    case 'chain.trade_closed': {
      const t = state.trades.get(b.trade_id);
      if (t) {
        t.paid_wei = b.paid_wei; t.delivered_wh = Math.max(t.delivered_wh || 0, b.delivered_wh);
        if (b.refunded_wei != null) t.refunded_wei = b.refunded_wei;
        renderTrades();
      }
      refreshWallet();
      refreshHistory();
      if (state.view === 'figures') refreshSiteFigures();
      break;
    }
    case 'chain.tx': {
      const ours = state.txs.has(b.tx_hash);
      track(b.tx_hash, { kind: b.kind, ref: b.ref, update: { status: b.status, reason: b.reason, block: b.block } });
      if (!ours && b.status !== 'pending') refreshWallet();
      break;
    }
    case 'chain.minted':
      refreshWallet();
      break;
    case 'chain.mining':
      state.miningOff = !b.mining;
      loadMining();
      renderTxs();
      for (const t of state.txs.values()) renderTx(t);
      break;
    case 'meter.reading':
      if (b.sim_ts != null && b.time_scale) state.clock = { wall: msg.ts, sim: b.sim_ts, scale: b.time_scale, simulated: true };
      // the site's role from its meters (a producer meter makes a producer site)
      if (b.role === 'producer' && state.role !== 'producer') setRole('producer');
      if (state.site && !state.site.role) { state.site.role = b.role; setRole(b.role); }
      state.readings.push({ at: msg.ts, sim_at: b.sim_ts ?? msg.ts, meter: b.meter, role: b.role, power_w: b.power_w,
        pv_w: b.pv_w, load_w: b.load_w, soc: b.soc, energy_wh: b.energy_wh, relay_closed: b.relay_closed });
      if (state.readings.length > 2000) state.readings.shift();
      renderFigures();
      if (state.view === 'figures') renderChartsSoon();
      break;
    default:
      break;
  }
}

// --- start -------------------------------------------------------------------------------------

async function start() {
  loadPrefs();
  $('#login-form').addEventListener('submit', login);
  $('#logout').addEventListener('click', logout);
  $('#transfer-form').addEventListener('submit', transfer);
  $('#sell-form').addEventListener('submit', sell);
  amountForm('#deposit-form', '#deposit-amount', '#deposit-status', '/api/escrow/deposit', 'deposit',
    (w) => `Deposit of ${etherText(w)}`);
  amountForm('#withdraw-form', '#withdraw-amount', '#withdraw-status', '/api/escrow/withdraw', 'withdraw',
    (w) => `Withdrawal of ${etherText(w)} from escrow`);
  $('#withdraw-all').addEventListener('click', () => {
    if (state.wallet) { $('#withdraw-amount').value = exactEther(state.wallet.escrow_free_wei); $('#withdraw-amount').focus(); }
  });
  $('#withdraw-credit').addEventListener('click', (e) => guarded(e.target, async () => {
    const credit = state.wallet.credit_wei;
    const what = `Withdrawing your earnings of ${etherText(credit)}`;
    status($('#withdraw-credit-status'), `${what}: sending to your wallet…`, 'submitted');
    const r = await api('POST', '/api/credit/withdraw', { amount_wei: credit });
    track(r.tx_hash, { kind: 'withdraw_credit', ref: credit, what, statusEl: $('#withdraw-credit-status') });
  }, { statusEl: $('#withdraw-credit-status') }));
  $('#unlock-form').addEventListener('submit', unlock);
  $('#unlock-cancel').addEventListener('click', () => unlockDone(false));
  $('#unlock-dialog').addEventListener('close', () => unlockDone(false));
  $('#locked-unlock').addEventListener('click', () => { askUnlock(); });
  $('#unit-ether').addEventListener('change', (e) => { prefs.ether = e.target.value; savePrefs(); applyUnits(); });
  $('#unit-energy').addEventListener('change', (e) => { prefs.energy = e.target.value; savePrefs(); applyUnits(); });
  $('#market-deposit').addEventListener('click', () => setTimeout(() => $('#deposit-amount').focus(), 50));
  for (const id of ['#transfer-to', '#transfer-amount']) {
    $(id).addEventListener('input', (e) => { e.target.removeAttribute('aria-invalid'); $(`${id}-error`).textContent = ''; });
  }
  $('#figures-range').addEventListener('submit', showRange);
  $('#figures-today').addEventListener('click', showToday);
  setInterval(() => { if (state.me && state.view === 'figures') loadSiteFigures(); }, 15000);
  window.addEventListener('hashchange', route);
  window.addEventListener('resize', renderChartsSoon);
  setInterval(tick, 250);
  setInterval(checkSession, 10000);
  initAgent();
  initOrders({ simOf, mine, run: (button, fn, statusEl) => guarded(button, fn, { statusEl }) });
  setInterval(() => { if (state.view === 'agent') loadAgent(); }, 3000);
  applyUnits();
  setRole('consumer');
  try {
    state.me = await api('GET', '/api/session');
    loggedIn();
  } catch (e) {
    loadSite();
    loggedOut();
  }
}

start();
