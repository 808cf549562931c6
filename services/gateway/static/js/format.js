// Amounts, energy, addresses and the site's time, as a person reads and types them.
// Wei never goes through a float: amounts are BigInt until they become text.

const WEI = 10n ** 18n;

// the units a person may choose (Settings); prices are always per kWh
export const ETHER_UNITS = { Ether: 18, mEther: 15, gwei: 9 };
export const ENERGY_UNITS = { kWh: 3, Wh: 0 };
export const prefs = { ether: 'Ether', energy: 'kWh' };

export function loadPrefs() {
  try {
    const p = JSON.parse(localStorage.getItem('gridtrade.units') || '{}');
    if (p.ether in ETHER_UNITS) prefs.ether = p.ether;
    if (p.energy in ENERGY_UNITS) prefs.energy = p.energy;
  } catch (e) { /* defaults */ }
}

export function savePrefs() {
  try { localStorage.setItem('gridtrade.units', JSON.stringify(prefs)); } catch (e) { /* private mode */ }
}

// --- numbers as decimal text (exact) -------------------------------------------------------

// the integer `v` divided by 10**decimals, every digit kept
function exactDecimal(v, decimals) {
  const neg = v < 0n;
  const a = neg ? -v : v;
  if (decimals === 0) return (neg ? '-' : '') + a.toString();
  const base = 10n ** BigInt(decimals);
  const frac = (a % base).toString().padStart(decimals, '0').replace(/0+$/, '');
  return (neg ? '-' : '') + (a / base).toString() + (frac ? '.' + frac : '');
}

// rounded half up to `digits` decimals, trailing zeros dropped; never a false zero
function roundedDecimal(v, decimals, digits) {
  if (digits >= decimals) return exactDecimal(v, decimals);
  const neg = v < 0n;
  const a = neg ? -v : v;
  const step = 10n ** BigInt(decimals - digits);
  const q = (a + step / 2n) / step;
  if (q === 0n && a !== 0n) return (neg ? '> -0.' : '< 0.') + '0'.repeat(digits - 1) + '1';
  return (neg && q !== 0n ? '-' : '') + exactDecimal(q, digits).replace(/^-/, '');
}

// --- Ether ---------------------------------------------------------------------------------

export const etherUnit = () => prefs.ether;
const etherDecimals = () => ETHER_UNITS[prefs.ether];
// shown decimals: 6 for Ether, fewer for the smaller units (same resolution)
const shownDigits = (extra = 0) => Math.max(0, 6 + extra - (18 - etherDecimals()));

export function fmtEther(wei, extra = 0) {
  return roundedDecimal(BigInt(wei), etherDecimals(), shownDigits(extra));
}

export function exactEther(wei) {
  return exactDecimal(BigInt(wei), etherDecimals());
}

export const etherText = (wei) => `${fmtEther(wei)} ${etherUnit()}`;
export const priceText = (weiPerKwh) => `${fmtEther(weiPerKwh, 3)} ${etherUnit()}/kWh`;

// an amount typed in the chosen unit -> wei (decimal string); throws with words
export function parseEther(text, what = 'the amount') {
  const s = String(text).trim().replace(/,/g, '.');
  const d = etherDecimals();
  const unit = etherUnit();
  if (!s) throw new Error(`Enter ${what} in ${unit}.`);
  if (!new RegExp(`^[0-9]+(\\.[0-9]{0,${d}})?$`).test(s) && !(d === 0 && /^[0-9]+$/.test(s))) {
    throw new Error(`Enter ${what} in ${unit} like 0.5: digits and a point, at most ${d} decimals.`);
  }
  const [whole, frac = ''] = s.split('.');
  const wei = (BigInt(whole) * 10n ** BigInt(d) + BigInt(frac.padEnd(d, '0') || '0')) * 10n ** BigInt(18 - d);
  if (wei <= 0n) throw new Error(`${what[0].toUpperCase()}${what.slice(1)} must be more than 0.`);
  return wei.toString();
}

// --- energy --------------------------------------------------------------------------------

export const energyUnit = () => prefs.energy;

export function fmtEnergy(wh) {
  return exactDecimal(BigInt(Math.round(Number(wh))), ENERGY_UNITS[prefs.energy]);
}

export const energyText = (wh) => `${fmtEnergy(wh)} ${energyUnit()}`;

// energy typed in the chosen unit -> Wh (integer); throws with words
export function parseEnergy(text) {
  const s = String(text).trim().replace(/,/g, '.');
  const d = ENERGY_UNITS[prefs.energy];
  const ok = d ? new RegExp(`^[0-9]{1,7}(\\.[0-9]{1,${d}})?$`) : /^[0-9]{1,10}$/;
  if (!ok.test(s)) {
    throw new Error(d ? `Enter the energy in kWh, with at most ${d} decimals (e.g. 1.5).`
      : 'Enter the energy in whole Wh (e.g. 1500).');
  }
  const [whole, frac = ''] = s.split('.');
  const wh = Number(BigInt(whole) * 10n ** BigInt(d) + BigInt(frac.padEnd(d, '0') || '0'));
  if (wh <= 0) throw new Error('The energy must be more than 0.');
  return wh;
}

// power in kW, for "now" figures and charts
export const kw = (w) => (w == null ? '–' : (Number(w) / 1000).toFixed(Math.abs(w) >= 10000 ? 1 : 2));

// cost of `wh` at a price in wei per kWh (the contract's rounding: down)
export const costWei = (wh, weiPerKwh) => (BigInt(wh) * BigInt(weiPerKwh)) / 1000n;

// --- addresses (EIP-55) ---------------------------------------------------------------------

export function checksum(address) {
  const hex = address.slice(2).toLowerCase();
  const hash = window.keccak256(hex);
  let out = '0x';
  for (let i = 0; i < 40; i += 1) out += parseInt(hash[i], 16) >= 8 ? hex[i].toUpperCase() : hex[i];
  return out;
}

// an address as typed -> its checksummed form; throws with words
export function checkAddress(text) {
  const s = String(text).trim();
  if (!/^0x[0-9a-fA-F]{40}$/.test(s)) {
    throw new Error('The recipient is an account address: 0x followed by 40 hexadecimal digits (0-9, a-f).');
  }
  const digits = s.slice(2);
  const oneCase = digits === digits.toLowerCase() || digits === digits.toUpperCase();
  if (!window.keccak256) return s;  // the hash library did not load: the server checks it
  const good = checksum(s);
  if (!oneCase && good !== s) {
    throw new Error('This address has a typo: its mix of upper and lower case letters (its checksum) does not '
      + 'match. Copy it again from its owner.');
  }
  return good;
}

export function short(addr) {
  return addr ? addr.slice(0, 8) + '…' + addr.slice(-4) : '';
}

// --- time ----------------------------------------------------------------------------------

export function countdown(seconds) {
  if (seconds <= 0) return 'ended';
  const s = Math.ceil(seconds);
  const m = Math.floor(s / 60);
  return m > 0 ? `${m}m ${String(s % 60).padStart(2, '0')}s` : `${s}s`;
}

const two = (n) => String(n).padStart(2, '0');

// the site's time of day (this browser's time zone), with the date when asked
export function siteTime(ts, withDate = false, withSeconds = false) {
  if (ts == null) return '';
  const d = new Date(ts * 1000);
  const hm = `${two(d.getHours())}:${two(d.getMinutes())}${withSeconds ? ':' + two(d.getSeconds()) : ''}`;
  if (!withDate) return hm;
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${hm}`;
}
