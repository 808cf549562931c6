// Ether and energy amounts as exact decimal strings (wei never goes through a float).

const WEI = 10n ** 18n;

export function formatEther(wei, digits = 6) {
  const v = BigInt(wei);
  const neg = v < 0n;
  const a = neg ? -v : v;
  const whole = a / WEI;
  let frac = (a % WEI).toString().padStart(18, '0').slice(0, digits).replace(/0+$/, '');
  return (neg ? '-' : '') + whole.toString() + (frac ? '.' + frac : '');
}

export function parseEther(text) {
  const s = String(text).trim();
  if (!/^[0-9]+(\.[0-9]{1,18})?$/.test(s)) {
    throw new Error('Enter an amount of Ether like 0.5 (digits, at most 18 decimals).');
  }
  const [whole, frac = ''] = s.split('.');
  const wei = BigInt(whole) * WEI + BigInt(frac.padEnd(18, '0'));
  if (wei <= 0n) throw new Error('The amount must be more than 0.');
  return wei.toString();
}

export function kwh(wh) {
  const v = Number(wh) / 1000;
  return v.toLocaleString('en-US', { maximumFractionDigits: 3, useGrouping: false });
}

export function parseKwh(text) {
  const s = String(text).trim();
  if (!/^[0-9]{1,7}(\.[0-9]{1,3})?$/.test(s) || Number(s) <= 0) {
    throw new Error('Enter the energy in kWh, more than 0, with at most 3 decimals (e.g. 1.5).');
  }
  return s;
}

export function short(addr) {
  return addr ? addr.slice(0, 8) + '…' + addr.slice(-4) : '';
}

export function countdown(seconds) {
  if (seconds <= 0) return 'ended';
  const s = Math.ceil(seconds);
  const m = Math.floor(s / 60);
  return m > 0 ? `${m}m ${String(s % 60).padStart(2, '0')}s` : `${s}s`;
}
