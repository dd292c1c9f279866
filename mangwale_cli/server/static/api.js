// REST calls and the API token: the only place that knows about HTTP and Authorization.
//
// The token lives in sessionStorage (this tab only). It goes out as `Authorization: Bearer`
// on REST calls and as the `mangwale.bearer.<base64url>` WebSocket subprotocol, never in a URL.

const TOKEN_KEY = "mangwale.token";
export const SUBPROTOCOL = "mangwale.v1";
const BEARER_PREFIX = "mangwale.bearer.";

/** An API error with the server's {"error": {code, message, field}} body. */
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
  get isAuth() {
    return this.status === 401 || this.status === 403;
  }
}

export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage disabled: the token then lasts until the page is closed.
  }
}

/** base64url of the token's UTF-8 bytes, without padding (a valid subprotocol token). */
export function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Subprotocols for /ws/training: always mangwale.v1, plus the bearer token when there is one. */
export function wsProtocols() {
  const token = getToken();
  return token ? [SUBPROTOCOL, BEARER_PREFIX + base64url(token)] : [SUBPROTOCOL];
}

/** ws(s):// URL of the live stream, relative to the page (so a path prefix keeps working). */
export function wsUrl(params) {
  const url = new URL("ws/training", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, String(v));
  }
  return url.toString();
}

let onAuthError = () => {};

/** Called with the ApiError of every 401/403, so the page can ask for a token. */
export function setAuthErrorHandler(fn) {
  onAuthError = fn;
}

/** One REST call; resolves with the parsed JSON body (null for 204), rejects with ApiError. */
export async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = getToken();
  if (token) headers.Authorization = "Bearer " + token;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(new URL(path, document.baseURI), init);
  } catch (err) {
    throw new ApiError(0, "unreachable", "the server could not be reached");
  }
  if (res.status === 204) return null;
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const e = (data && data.error) || {};
    const err = new ApiError(res.status, e.code || "http_" + res.status, e.message || res.statusText || "request failed", e.field);
    if (err.isAuth) onAuthError(err);
    throw err;
  }
  return data;
}

export const api = {
  jobs: (limit = 100) => request("GET", `training/jobs?limit=${limit}`),
  job: (id) => request("GET", `training/jobs/${encodeURIComponent(id)}`),
  jobEvents: (id) => request("GET", `training/jobs/${encodeURIComponent(id)}/events`),
  jobLogs: (id) => request("GET", `training/jobs/${encodeURIComponent(id)}/logs`),
  jobMetrics: (id) => request("GET", `training/jobs/${encodeURIComponent(id)}/metrics`),
  createJob: (body) => request("POST", "training/jobs", body),
  cancelJob: (id) => request("POST", `training/jobs/${encodeURIComponent(id)}/cancel`),
  kinds: () => request("GET", "training/kinds"),
  workers: () => request("GET", "workers"),
  datasets: () => request("GET", "training/datasets"),
  createDataset: (body) => request("POST", "training/datasets", body),
};
