// The Agent page: what the site's agent does, the owner's limits (saved to the agent through
// PUT /api/agent/limits) and its latest offers and bids. Amounts in the chosen units.

import { api } from './api.js';
import { energyText, exactEther, fmtEnergy, parseEnergy, parseEther, priceText, siteTime } from './format.js';

const $ = (sel, root = document) => root.querySelector(sel);

let last = null;       // the last /api/agent answer
let editing = false;   // the owner is typing: a refresh leaves the form alone

const STATE_WORDS = { trading: 'Trading for you', waiting: 'Waiting', off: 'Off: you trade by hand' };

function forecastWords(a) {
  if (a.surplus_wh > 0) return `${energyText(a.surplus_wh)} to sell`;
  if (a.deficit_wh > 0) return `${energyText(a.deficit_wh)} to buy`;
  const net = Math.round(a.forecast_net_wh);
  return net >= 0 ? `about ${energyText(net)} spare, nothing to trade` : `about ${energyText(-net)} short, covered`;
}

function fillForm(a) {
  const l = a.limits;
  $('#agent-enabled').checked = l.enabled;
  $('#agent-reserve').value = Math.round(l.reserve_soc * 100);
  $('#agent-max-buy').value = l.max_buy_wei_per_kwh == null ? '' : exactEther(l.max_buy_wei_per_kwh);
  $('#agent-min-sell').value = l.min_sell_wei_per_kwh == null ? '' : exactEther(l.min_sell_wei_per_kwh);
  $('#agent-max-trade').value = fmtEnergy(l.max_trade_wh);
  $('#agent-hours').value = String(l.horizon_s / 3600);
}

export function renderAgent(a = last) {
  if (!a) return;
  last = a;
  $('#agent-state').textContent = STATE_WORDS[a.state] || a.state;
  $('#agent-state').dataset.state = a.state;
  $('#agent-waiting').textContent = a.state === 'waiting' ? `for ${a.waiting_for}` : '';
  $('#agent-horizon').textContent = String(a.limits.horizon_s / 3600);
  $('#agent-forecast').textContent = forecastWords(a);
  $('#agent-soc').textContent = a.soc == null ? 'unknown' : `${Math.round(a.soc * 100)} %`;
  $('#agent-cap').textContent = priceText(a.max_buy_wei_per_kwh);
  $('#agent-floor').textContent = priceText(a.min_sell_wei_per_kwh);
  $('#agent-retail').textContent = priceText(a.retail_wei_per_kwh);
  $('#agent-feedin').textContent = priceText(a.feed_in_wei_per_kwh);
  if (!editing) fillForm(a);
  const body = $('#agent-actions tbody');
  body.replaceChildren(...a.actions.map((x) => {
    const tr = document.createElement('tr');
    const when = siteTime(x.sim_at == null ? x.at : x.sim_at, true, true);
    const cells = [when, x.kind === 'bid' ? `bid on ${x.offer_id}` : x.kind,
      energyText(x.wh), priceText(x.price_wei_per_kwh), x.ok ? 'placed' : `refused: ${x.note}`];
    for (const c of cells) { const td = document.createElement('td'); td.textContent = c; tr.append(td); }
    if (!x.ok) tr.className = 'failed';
    return tr;
  }));
  $('#agent-actions-empty').hidden = a.actions.length > 0;
}

export async function loadAgent() {
  try {
    renderAgent(await api('GET', '/api/agent'));
  } catch (e) {
    $('#agent-state').textContent = e.code === 'no_agent' ? 'No agent at this site' : 'Not reachable';
    $('#agent-waiting').textContent = e.message;
  }
}

function limitsFromForm() {
  const price = (sel, what) => { const v = $(sel).value.trim(); return v ? parseEther(v, what) : null; };
  const pct = Number($('#agent-reserve').value);
  if (!Number.isFinite(pct) || pct < 0 || pct > 100) throw new Error('Enter the battery kept as 0 to 100 %.');
  const hours = Number($('#agent-hours').value);
  if (!Number.isFinite(hours) || hours <= 0 || hours > 168) throw new Error('Look ahead 0.25 to 168 hours.');
  return {
    enabled: $('#agent-enabled').checked,
    reserve_soc: pct / 100,
    max_buy_wei_per_kwh: price('#agent-max-buy', 'the most you pay'),
    min_sell_wei_per_kwh: price('#agent-min-sell', 'the least you sell for'),
    max_trade_wh: parseEnergy($('#agent-max-trade').value),
    horizon_s: Math.round(hours * 3600),
  };
}

export function initAgent() {
  const form = $('#agent-form');
  form.addEventListener('input', () => { editing = true; });
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const st = $('#agent-status');
    let limits;
    try {
      limits = limitsFromForm();
    } catch (e) {
      st.textContent = e.message;
      st.dataset.state = 'failed';
      return;
    }
    $('#agent-save').disabled = true;
    st.textContent = 'Saving…';
    st.dataset.state = 'pending';
    try {
      const a = await api('PUT', '/api/agent/limits', limits);
      editing = false;
      renderAgent(a);
      st.textContent = a.limits.enabled ? 'Saved: the agent follows these limits from its next decision.'
        : 'Saved: the agent is off. Trade by hand on the Market page.';
      st.dataset.state = 'confirmed';
    } catch (e) {
      st.textContent = e.message;
      st.dataset.state = 'failed';
    } finally {
      $('#agent-save').disabled = false;
    }
  });
}
