// Charts of generation, consumption and price over time, drawn with the vendored uPlot.

const KEEP = 600; // points per series

function make(el, series, yLabel) {
  if (!window.uPlot) return null;
  const opts = {
    width: Math.max(300, el.clientWidth || 600), height: 220,
    scales: { x: { time: true } },
    series: [{}, ...series],
    axes: [{}, { label: yLabel }],
  };
  const data = [[], ...series.map(() => [])];
  const plot = new window.uPlot(opts, data, el);
  return { plot, data };
}

export class Charts {
  constructor(energyEl, priceEl) {
    this.energyEl = energyEl;
    this.priceEl = priceEl;
    this.energy = null;
    this.price = null;
    window.addEventListener('resize', () => this.resize());
  }

  ensure() {
    if (!this.energy && this.energyEl.offsetParent !== null) {
      this.energy = make(this.energyEl, [
        { label: 'generation (W)', stroke: '#2f7d4f', width: 2 },
        { label: 'consumption (W)', stroke: '#c0392b', width: 2 },
      ], 'W');
    }
    if (!this.price && this.priceEl.offsetParent !== null) {
      this.price = make(this.priceEl, [
        { label: 'bid (Ether/kWh)', stroke: '#2c6fbb', width: 0, points: { show: true, size: 6 } },
        { label: 'trade (Ether/kWh)', stroke: '#c99a1a', width: 2, points: { show: true, size: 8 } },
      ], 'Ether/kWh');
    }
    this.redraw();
  }

  resize() {
    for (const [c, el] of [[this.energy, this.energyEl], [this.price, this.priceEl]]) {
      if (c && el.clientWidth) c.plot.setSize({ width: el.clientWidth, height: 220 });
    }
  }

  push(store, ts, values) {
    store.x.push(ts);
    values.forEach((v, i) => store.y[i].push(v));
    if (store.x.length > KEEP) {
      store.x.shift();
      store.y.forEach((s) => s.shift());
    }
  }

  redraw() {
    if (this.energy) this.energy.plot.setData([this.e.x, ...this.e.y]);
    if (this.price) this.price.plot.setData([this.p.x, ...this.p.y]);
  }

  get e() { return this._e || (this._e = { x: [], y: [[], []] }); }
  get p() { return this._p || (this._p = { x: [], y: [[], []] }); }

  reading(ts, body) {
    const gen = body.pv_w != null ? body.pv_w : (body.role === 'producer' ? body.power_w : null);
    const use = body.load_w != null ? body.load_w : (body.role === 'consumer' ? body.power_w : null);
    this.push(this.e, ts, [gen, use]);
    if (this.energy) this.energy.plot.setData([this.e.x, ...this.e.y]);
  }

  bid(ts, etherPerKwh) {
    this.push(this.p, ts, [etherPerKwh, null]);
    if (this.price) this.price.plot.setData([this.p.x, ...this.p.y]);
  }

  trade(ts, etherPerKwh) {
    this.push(this.p, ts, [null, etherPerKwh]);
    if (this.price) this.price.plot.setData([this.p.x, ...this.p.y]);
  }
}
