// The management API from the browser: the token (sessionStorage), 401 -> ask once, errors.
const KEY = "audiences-token";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

let asking = null;
function askToken(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-reason").textContent = reason;
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const token = input.value.trim();
      input.value = "";
      if (token) sessionStorage.setItem(KEY, token);
      asking = null;
      resolve(Boolean(token));
    }, { once: true });
  });
  dialog.showModal();
  input.focus();
  return asking;
}

export function headers(extra = {}) {
  const token = sessionStorage.getItem(KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

// fetch with the token; a 401 asks for a token and tries again; other errors throw ApiError.
export async function request(method, path, body, { raw = false, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }), signal };
    if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.status === 401 && attempt < 3) {
      const had = sessionStorage.getItem(KEY);
      if (had) sessionStorage.removeItem(KEY);
      const ok = await askToken(had ? "That token was refused; enter another." : "This worker needs an API token (AUDIENCES_API_TOKENS). It is kept in this tab only (sessionStorage).");
      if (!ok) throw new ApiError(401, { error: "no token" });
      continue;
    }
    if (raw) {
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
      return response;
    }
    const data = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

export const get = (path, opts) => request("GET", path, undefined, opts);

// A server-sent-events stream read with fetch (EventSource cannot send the token).
export async function stream(path, onEvent, signal) {
  const response = await request("GET", path, undefined, { raw: true, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(event, JSON.parse(data));
    }
  }
}

// Whether a token of this tab may do something, learned from a 403 (null: not known).
export function scopeMessage(error, what) {
  if (error instanceof ApiError && error.status === 403) {
    return `Your token cannot ${what}: ${error.message}. Use a token with more scope (reload and enter it after clearing this tab's session).`;
  }
  return null;
}

export function forgetToken() { sessionStorage.removeItem(KEY); }
