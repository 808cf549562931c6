// The double auction's panel on the Market page (shown when the market runs it): an order
// form, the order book of the call being collected with its countdown, and a chart of the
// cleared calls' prices and volumes. Amounts in the chosen units; times in the site's time.

import { api } from './api.js';
import { draw } from './charts.js';
import {
  countdown, energyText, energyUnit, etherUnit, exactEther, fmtEnergy, parseEnergy, parseEther,
  priceText, siteTime,
} from './format.js';

const $ = (sel, root = document) => root.querySelector(sel);

const ctx = {
  simOf: (ts) => ts,           // wall time -> the site's time
  mine: () => false,           // is this address the session's?
  run: async (button, fn) => fn(),  // an action with the page's locked-key and error handling
};
let book = null;               // the last /api/orders answer
let skew = 0;                  // server time - local time, seconds
let running = false;           // the market runs the double auction
let loading = null;
let soon = null;

const serverNow = () => Date.now() / 1000 + skew;
const marketShown = () => !$('#view-market').hidden;

export function runsDouble(market) {
  return market === 'double' || market === 'both';
}

// the market's setting (GET /api/site): the panel is shown only when the double auction runs
export function setOrdersMarket(market, role) {
  running = runsDouble(market);
  $('#double-panel').hidden = !running;
  const side = role === 'producer' ? 'sell' : 'buy';
  if (!$('#order-form').dataset.touched) $(`#order-${side}`).checked = true;
  sideWords();
  if (running && marketShown()) loadOrders();
}

function sideWords() {
  const sell = $('#order-sell').checked;
  $('#order-price-what').textContent = sell ? 'the least you sell for' : 'the most you pay';
  $('#order-btn').textContent = sell ? 'Place sell order' : 'Place buy order';
}

export async function loadOrders() {
  if (!running) return;
  if (loading) return loading;
  loading = (async () => {
    try {
      const b = await api('GET', '/api/orders');
      skew = b.now - Date.now() / 1000;
      book = b;
      renderOrders();
    } catch (e) {
      $('#order-book-note').textContent = `The order book cannot be read now: ${e.message}`;
    } finally {
      loading = null;
    }
  })();
  return loading;
}

// a market.* event: the book changed (an order) or a call cleared
export function onOrdersEvent(type) {
  if (!running || !['market.order_placed', 'market.cleared'].includes(type)) return;
  clearTimeout(soon);
  soon = setTimeout(loadOrders, 150);
}

function cell(tr, label, text, cls = '') {
  const td = document.createElement('td');
  td.dataset.label = label;
  td.textContent = text;
  if (cls) td.className = cls;
  tr.append(td);
  return td;
}

function row(o) {
  const tr = document.createElement('tr');
  tr.dataset.order = o.order_id;
  tr.dataset.side = o.side;
  tr.className = `${o.side === 'sell' ? 'ask' : 'bid'}${o.mine ? ' mine' : ''}`;
  cell(tr, 'Side', o.side === 'sell' ? 'sell (ask)' : 'buy (bid)');
  const e = cell(tr, 'Energy', energyText(o.wh), 'num');
  e.dataset.wh = String(o.wh);
  const p = cell(tr, 'Limit', priceText(o.limit_price_wei_per_kwh), 'num');
  p.dataset.wei = o.limit_price_wei_per_kwh;
  p.title = `${exactEther(o.limit_price_wei_per_kwh)} ${etherUnit()}/kWh exactly`;
  const who = cell(tr, 'From', o.mine ? 'you' : o.site);
  if (o.mine) {
    const b = document.createElement('span');
    b.className = 'badge yours';
    b.textContent = 'your order';
    who.append(' ', b);
  }
  return tr;
}

function lastCallWords(b) {
  const call = b.calls[b.calls.length - 1];
  if (!call) return 'No call has cleared yet.';
  const when = siteTime(ctx.simOf(call.cleared_at), false, true);
  let words = call.price_wei_per_kwh == null
    ? `The last call (${when}) cleared nothing: no buy limit reached a sell limit.`
    : `The last call (${when}) cleared ${energyText(call.volume_wh)} at ${priceText(call.price_wei_per_kwh)}.`;
  const mineLast = b.last_orders.filter((o) => o.mine);
  for (const o of mineLast) {
    words += ` Your ${o.side} order of ${energyText(o.wh)}: ${o.filled_wh ? `${energyText(o.filled_wh)} filled` : 'not filled'}.`;
  }
  return words;
}

export function renderOrders() {
  if (!book || !running) return;
  const b = book;
  $('#da-interval').textContent = String(b.interval_s);
  $('#da-clears-at').textContent = siteTime(ctx.simOf(b.clears_at), false, true);
  $('#double-panel').dataset.clearsAt = String(b.clears_at);
  $('#double-panel').dataset.round = String(b.round);
  const orders = b.orders.map((o) => ({ ...o, mine: o.mine || ctx.mine(o.account) }));
  $('#order-book tbody').replaceChildren(...orders.map(row));
  $('#order-book-empty').hidden = orders.length > 0;
  $('#order-book').hidden = orders.length === 0;
  $('#order-book-note').textContent = lastCallWords(b);
  for (const u of document.querySelectorAll('#double-panel .u-energy')) u.textContent = energyUnit();
  for (const u of document.querySelectorAll('#double-panel .u-ether')) u.textContent = etherUnit();
  tickOrders();
  drawCalls();
}

function drawCalls() {
  const box = $('#chart-calls');
  if (!book || !box || box.offsetParent === null) return;
  const calls = book.calls;
  const at = (c) => ctx.simOf(c.cleared_at);
  const priced = calls.filter((c) => c.price_wei_per_kwh != null);
  const last = priced[priced.length - 1];
  draw(box, {
    title: 'Cleared calls', yLabel: `${etherUnit()}/kWh`, minSpan: 4 * book.interval_s * Math.max(1, ctx.simOf(1) - ctx.simOf(0)),
    series: [{ label: 'clearing price', color: '#6d3fa0', kind: 'dots', size: 5, cls: 'clear',
      points: priced.map((c) => [at(c), Number(exactEther(c.price_wei_per_kwh)),
        `call ${c.round}: ${energyText(c.volume_wh)} at ${priceText(c.price_wei_per_kwh)}`]) }],
    empty: 'No call has cleared at a price yet.',
    summary: last ? `Last clearing price: ${priceText(last.price_wei_per_kwh)} for ${energyText(last.volume_wh)}.` : '',
  });
  box.dataset.calls = String(priced.length);
  const vol = $('#chart-call-volume');
  if (!vol) return;
  draw(vol, {
    title: 'Cleared volume', yLabel: energyUnit(), minSpan: 4 * book.interval_s * Math.max(1, ctx.simOf(1) - ctx.simOf(0)),
    series: [{ label: `volume (${energyUnit()})`, color: '#9a6a00', kind: 'dots', size: 5, cls: 'volume',
      points: calls.map((c) => [at(c), Number(fmtEnergy(c.volume_wh)), `call ${c.round}: ${energyText(c.volume_wh)}`]) }],
    empty: 'No call has cleared yet.',
    summary: calls.length ? `${calls.length} calls; ${calls.filter((c) => c.volume_wh > 0).length} traded.` : '',
  });
}

export function tickOrders() {
  if (!book || !running) return;
  const left = book.clears_at - serverNow();
  $('#da-countdown').textContent = left > 0 ? countdown(left) : 'clearing now';
  if (left < -1 && marketShown()) loadOrders();  // the call cleared: the next one
}

function showError(text, input) {
  const err = $('#order-error');
  err.textContent = text;
  for (const i of ['#order-kwh', '#order-price']) $(i).removeAttribute('aria-invalid');
  if (input) { input.setAttribute('aria-invalid', 'true'); input.focus(); }
}

async function placeOrder(ev) {
  ev.preventDefault();
  const side = $('#order-sell').checked ? 'sell' : 'buy';
  let wh;
  let price;
  try {
    wh = parseEnergy($('#order-kwh').value);
  } catch (e) { showError(e.message, $('#order-kwh')); return; }
  try {
    price = parseEther($('#order-price').value, side === 'sell' ? 'the least you sell for' : 'the most you pay');
  } catch (e) { showError(e.message, $('#order-price')); return; }
  showError('');
  const st = $('#order-status');
  await ctx.run($('#order-btn'), async () => {
    st.textContent = `Placing your ${side} order of ${energyText(wh)}…`;
    st.dataset.state = 'submitted';
    const r = await api('POST', '/api/orders', { side, wh, limit_price_wei_per_kwh: price });
    st.textContent = `Your ${side} order of ${energyText(r.wh)} at ${side === 'sell' ? 'least' : 'most'} `
      + `${priceText(r.limit_price_wei_per_kwh)} is in the call clearing at `
      + `${book ? siteTime(ctx.simOf(book.clears_at), false, true) : 'the next call'}.`;
    st.dataset.state = 'done';
    $('#order-kwh').value = '';
    await loadOrders();
  }, st);
}

export function initOrders(hooks) {
  Object.assign(ctx, hooks);
  $('#order-form').addEventListener('submit', placeOrder);
  for (const id of ['#order-sell', '#order-buy']) {
    $(id).addEventListener('change', () => { $('#order-form').dataset.touched = '1'; sideWords(); });
  }
  for (const id of ['#order-kwh', '#order-price']) {
    $(id).addEventListener('input', (e) => { e.target.removeAttribute('aria-invalid'); $('#order-error').textContent = ''; });
  }
  // the feed carries orders and clearings; this poll only keeps the page right if an event was missed
  setInterval(() => { if (running && marketShown()) loadOrders(); }, 4000);
  setInterval(tickOrders, 500);
  window.addEventListener('resize', () => { if (running && marketShown()) drawCalls(); });
  sideWords();
}

