// The gateway's REST API. Every failure becomes an ApiError whose message is for people
// (the gateway words refusals in Ether and kWh) and, where one exists, the fix to offer.

export class ApiError extends Error {
  constructor(status, code, message, fix) {
    super(message);
    this.status = status;
    this.code = code;
    this.fix = fix || null;
  }
}

export async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'offline', 'The gateway cannot be reached. Check your connection and try again.');
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  if (!resp.ok) {
    const err = data && data.error;
    throw new ApiError(resp.status, err ? err.code : 'http_' + resp.status,
      err ? err.message : `The gateway answered ${resp.status}.`, err && err.fix);
  }
  return data;
}
