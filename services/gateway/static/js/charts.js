// Small SVG charts with time axes in the site's time: lines, dots, shaded spans (trades)
// and markers. The axes are text in the page (readable, testable), the legend is HTML,
// and each chart says what it shows in its accessible name.

import { siteTime } from './format.js';

const NS = 'http://www.w3.org/2000/svg';
const H = 240;
const PAD = { l: 58, r: 12, t: 12, b: 40 };
const TIME_STEPS = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];

function el(name, attrs = {}, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text != null) e.textContent = text;
  return e;
}

// ticks at multiples of a whole step (1 min ... 1 week) of the site's clock, about `count` of them
export function timeTicks(min, max, count) {
  const span = Math.max(1, max - min);
  const step = TIME_STEPS.find((s) => span / s <= count) || TIME_STEPS[TIME_STEPS.length - 1];
  const offset = new Date(min * 1000).getTimezoneOffset() * 60;  // whole hours in local time
  const first = Math.ceil((min - offset) / step) * step + offset;
  const out = [];
  for (let t = first; t <= max + 1e-6; t += step) out.push(t);
  return { ticks: out, step };
}

// 1-2-5 ticks covering [min, max]
export function niceTicks(min, max, count) {
  if (!(max > min)) { max = min + (Math.abs(min) || 1); }
  const raw = (max - min) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) || 10 * mag;
  const lo = Math.floor(min / step) * step;
  const hi = Math.ceil(max / step) * step;
  const ticks = [];
  for (let v = lo; v <= hi + step / 1e6; v += step) ticks.push(Math.abs(v) < step / 1e6 ? 0 : v);
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9) + (step / mag === 2.5 ? 1 : 0));
  return { ticks, lo, hi, decimals };
}

function timeLabel(t, step, first) {
  const d = new Date(t * 1000);
  const midnight = d.getHours() === 0 && d.getMinutes() === 0;
  if (step >= 86400) return siteTime(t, true).slice(5, 10);
  return (midnight || first) && step >= 3600 ? `${siteTime(t, true).slice(5, 10)} ${siteTime(t)}` : siteTime(t);
}

// `spec`: {title, yLabel, yUnit, series: [{label, color, kind: 'line'|'dots'|'step'|'bars', points: [[t, y]]}],
//          spans: [{from, to, label}], markers: [{t, label}], minSpan (s), yMin0,
//          barWidth (s: the width of a group of 'bars' side by side around a point's time)}
export function draw(container, spec) {
  const width = Math.max(280, Math.floor(container.clientWidth || 600));
  const all = spec.series.flatMap((s) => s.points).filter((p) => p[1] != null && Number.isFinite(p[1]));
  const times = [...all.map((p) => p[0]), ...(spec.spans || []).flatMap((s) => [s.from, s.to]),
    ...(spec.markers || []).map((m) => m.t)].filter((t) => t != null);
  container.replaceChildren();
  const legend = document.createElement('ul');
  legend.className = 'legend';
  for (const s of spec.series) {
    const li = document.createElement('li');
    li.innerHTML = `<span class="swatch ${s.kind === 'dots' ? 'dot' : s.kind === 'bars' ? 'bar' : ''}" style="background:${s.color}"></span>`;
    li.append(document.createTextNode(s.label));
    legend.append(li);
  }
  if ((spec.spans || []).length) {
    const li = document.createElement('li');
    li.innerHTML = '<span class="swatch span"></span>';
    li.append(document.createTextNode(spec.spanLabel || 'trade running'));
    legend.append(li);
  }
  if (!times.length) {
    const p = document.createElement('p');
    p.className = 'sub chart-empty';
    p.textContent = spec.empty || 'Nothing to show yet.';
    container.append(p, legend);
    return;
  }
  let x0 = Math.min(...times);
  let x1 = Math.max(...times);
  const minSpan = spec.minSpan || 3600;
  if (spec.barWidth) { x0 -= spec.barWidth / 2; x1 += spec.barWidth / 2; }  // whole bars at the edges
  if (x1 - x0 < minSpan) { const mid = (x0 + x1) / 2; x0 = mid - minSpan / 2; x1 = mid + minSpan / 2; }
  const xpad = (x1 - x0) * 0.03;  // no dot sits on an edge
  x0 -= xpad; x1 += xpad;
  const ys = all.map((p) => p[1]);
  let y0 = ys.length ? Math.min(...ys) : 0;
  let y1 = ys.length ? Math.max(...ys) : 1;
  if (spec.yMin0 !== false) y0 = Math.min(0, y0);
  y1 += (y1 - y0) * 0.08;  // headroom: the highest point is not cut by the frame
  if (y1 - y0 < 1e-12) y1 = y0 + (Math.abs(y0) || 1) * 0.5 + (y0 === 0 ? 1 : 0);
  const yt = niceTicks(y0, y1, 4);
  const xt = timeTicks(x0, x1, Math.max(3, Math.floor((width - PAD.l - PAD.r) / 90)));
  const w = width - PAD.l - PAD.r;
  const h = H - PAD.t - PAD.b;
  const X = (t) => PAD.l + ((t - x0) / (x1 - x0)) * w;
  const Y = (v) => PAD.t + h - ((v - yt.lo) / (yt.hi - yt.lo)) * h;

  const svg = el('svg', { viewBox: `0 0 ${width} ${H}`, width, height: H, class: 'chart-svg', 'aria-hidden': 'true',
    focusable: 'false' });
  const clip = `clip-${Math.random().toString(36).slice(2)}`;
  const defs = el('defs');
  const cp = el('clipPath', { id: clip });
  cp.append(el('rect', { x: PAD.l, y: PAD.t, width: w, height: h }));
  defs.append(cp);
  svg.append(defs);
  for (const s of spec.spans || []) {
    const a = Math.max(X(s.from), PAD.l);
    const b = Math.min(X(s.to == null ? x1 : s.to), PAD.l + w);
    if (b > a) {
      const r = el('rect', { x: a, y: PAD.t, width: Math.max(2, b - a), height: h, class: 'span' });
      r.append(el('title', {}, s.label || 'trade'));
      svg.append(r);
    }
  }
  const gx = el('g', { class: 'axis x' });
  xt.ticks.forEach((t, i) => {
    gx.append(el('line', { x1: X(t), x2: X(t), y1: PAD.t, y2: PAD.t + h, class: 'grid' }));
    gx.append(el('text', { x: X(t), y: PAD.t + h + 16, 'text-anchor': 'middle', class: 'tick tick-x' },
      timeLabel(t, xt.step, i === 0)));
  });
  gx.append(el('text', { x: PAD.l + w / 2, y: H - 4, 'text-anchor': 'middle', class: 'axis-label' },
    spec.xLabel || 'site time'));
  svg.append(gx);
  const gy = el('g', { class: 'axis y' });
  for (const v of yt.ticks) {
    gy.append(el('line', { x1: PAD.l, x2: PAD.l + w, y1: Y(v), y2: Y(v), class: 'grid' }));
    gy.append(el('text', { x: PAD.l - 6, y: Y(v) + 4, 'text-anchor': 'end', class: 'tick tick-y' },
      v.toFixed(yt.decimals)));
  }
  gy.append(el('text', { x: 12, y: PAD.t + h / 2, transform: `rotate(-90 12 ${PAD.t + h / 2})`,
    'text-anchor': 'middle', class: 'axis-label' }, spec.yLabel));
  svg.append(gy);
  const plot = el('g', { 'clip-path': `url(#${clip})` });
  const bars = spec.series.filter((s) => s.kind === 'bars');
  for (const s of spec.series) {
    const pts = s.points.filter((p) => p[1] != null && Number.isFinite(p[1]));
    if (!pts.length) continue;
    if (s.kind === 'bars') {
      // side by side around each point's time, `barWidth` seconds for the group
      const group = Math.max(3, X(x0 + (spec.barWidth || 3600)) - X(x0));
      const one = group / bars.length;
      const i = bars.indexOf(s);
      for (const p of pts) {
        const top = Math.min(Y(p[1]), Y(0));
        const r = el('rect', { x: X(p[0]) - group / 2 + i * one, y: top, width: Math.max(1, one - 1),
          height: Math.max(p[1] ? 1 : 0, Math.abs(Y(p[1]) - Y(0))), fill: s.color, class: `bar ${s.cls || ''}` });
        if (p[2]) r.append(el('title', {}, p[2]));
        plot.append(r);
      }
    } else if (s.kind === 'dots') {
      for (const p of pts) {
        const c = el('circle', { cx: X(p[0]), cy: Y(p[1]), r: s.size || 4, fill: s.color, class: `dot ${s.cls || ''}` });
        if (p[2]) c.append(el('title', {}, p[2]));
        plot.append(c);
      }
    } else {
      let d = '';
      pts.forEach((p, i) => {
        if (s.kind === 'step' && i > 0) d += ` L${X(p[0]).toFixed(1)},${Y(pts[i - 1][1]).toFixed(1)}`;
        d += `${i ? ' L' : 'M'}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`;
      });
      plot.append(el('path', { d, fill: 'none', stroke: s.color, 'stroke-width': s.width || 2, class: 'line' }));
    }
  }
  for (const m of spec.markers || []) {
    const g = el('g', { class: 'marker' });
    g.append(el('line', { x1: X(m.t), x2: X(m.t), y1: PAD.t, y2: PAD.t + h }));
    g.append(el('polygon', { points: `${X(m.t) - 5},${PAD.t} ${X(m.t) + 5},${PAD.t} ${X(m.t)},${PAD.t + 7}` }));
    if (m.label) g.append(el('title', {}, m.label));
    plot.append(g);
  }
  svg.append(plot);
  const from = siteTime(x0, true);
  const to = siteTime(x1, siteTime(x0, true).slice(0, 10) !== siteTime(x1, true).slice(0, 10));
  const summary = document.createElement('p');
  summary.className = 'sub chart-summary';
  summary.textContent = `${from} to ${to} site time. ${spec.summary || ''}`.trim();
  container.dataset.from = String(x0);
  container.dataset.to = String(x1);
  container.append(svg, legend, summary);
}
