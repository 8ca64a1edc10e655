// Calls to the wesam server that served this page. URLs are relative: the page lives at /ui, so
// "segment" is /segment (and /prefix/segment behind a reverse proxy that serves wesam under a prefix).

const TOKEN_KEY = "wesam.adminToken";

/** A failed call, with wesam's JSON error `kind` and message (or "network" when there was no answer). */
export class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }

  toString() {
    return this.status ? `${this.kind} (${this.status}): ${this.message}` : `${this.kind}: ${this.message}`;
  }
}

// The admin token lives in this tab's sessionStorage only: gone when the tab closes, never in a URL.
export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

async function call(method, path, body, admin = false) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (admin && getToken()) headers.Authorization = `Bearer ${getToken()}`;
  let response;
  try {
    response = await fetch(path, {
      method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, "network", `cannot reach the server (${e.message})`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // not JSON (a proxy's error page): the status says enough
  }
  if (!response.ok) {
    const kind = (data && data.kind) || `http_${response.status}`;
    throw new ApiError(response.status, kind, (data && data.error) || response.statusText || "request failed");
  }
  return data;
}

const domainPath = (domain, action) => `adapters/${encodeURIComponent(domain)}/${action}`;

export const api = {
  adapters: () => call("GET", "adapters"),
  versions: (domain) => call("GET", domainPath(domain, "versions")),
  control: (domain) => call("GET", domainPath(domain, "control")),
  embed: (image, domain) => call("POST", "embed", { image, domain }),
  segment: (body) => call("POST", "segment", body),
  activate: (domain, version) => call("POST", domainPath(domain, "activate"), { version }, true),
  rollback: (domain, freeze) => call("POST", domainPath(domain, "rollback"), { freeze }, true),
};
