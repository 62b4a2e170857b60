// The Management API as the dashboard calls it: same-origin paths only, the management key in the
// Authorization header (never a cookie, never a URL), no caching, no referrer. Errors carry OpenAI's shape.

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  #key;

  constructor(key) {
    this.#key = key;
  }

  async #fetch(method, path, body) {
    const headers = { Authorization: `Bearer ${this.#key}` };
    const init = { method, headers, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
                   redirect: "error" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch {
      throw new ApiError(0, "The server could not be reached.", "network_error");
    }
    if (!resp.ok) {
      let message = `The server answered ${resp.status}.`;
      let code = null;
      try {
        const err = (await resp.json()).error;
        message = err.message || message;
        code = err.code;
      } catch { /* not JSON: keep the status line */ }
      throw new ApiError(resp.status, message, code);
    }
    return resp;
  }

  async json(method, path, body) {
    return (await this.#fetch(method, path, body)).json();
  }

  get(path) { return this.json("GET", path); }

  async blob(path) {
    return (await this.#fetch("GET", path)).blob();
  }

  /** Every inference key, following the list's pages. */
  async allKeys() {
    const keys = [];
    let after = "";
    for (;;) {
      const page = await this.get(`/api/keys?limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
      keys.push(...page.data);
      if (!page.has_more || !page.last_id) return keys;
      after = page.last_id;
    }
  }

  usage({ from, to, groupBy, keyId }) {
    const q = new URLSearchParams({ from: String(from), to: String(to), group_by: groupBy });
    const path = keyId ? `/api/usage/${encodeURIComponent(keyId)}` : "/api/usage";
    return this.get(`${path}?${q}`);
  }
}

/** The catalog needs no key. */
export async function plans() {
  const resp = await fetch("/api/plans", { credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer" });
  if (!resp.ok) throw new ApiError(resp.status, "The plan catalog could not be loaded.", null);
  return resp.json();
}
