// The control API as the page sees it: one fetch helper (token, total deadline, size cap, no redirects)
// and the event stream read with fetch() + a ReadableStream parser (EventSource cannot send a header).
// The token lives in sessionStorage (this tab only) and goes out as `Authorization: Bearer`: no cookie,
// so no request forged by another site carries it.

export const API = new URL("../v1/", document.baseURI);
const TOKEN_KEY = "flockparse.token";
const REPLY_MAX_BYTES = 32 * 1024 * 1024;
const STREAM_LINE_MAX = 1024 * 1024; // one SSE line longer than this: the stream is not ours
export const READ_TIMEOUT_MS = 15000;

/** 401: the serve wants a token (or another one). */
export class AuthNeeded extends Error {}

/** Any other failure, in one line: `status` 0 when no HTTP answer came. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return ""; // storage disabled: the page still works on a serve without a token
  }
}

export function setToken(value) {
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: the token is asked again on the next load */
  }
}

function headers(extra = {}) {
  const out = { ...extra };
  const value = token();
  if (value) out.Authorization = `Bearer ${value}`;
  return out;
}

/** The deadline as an AbortSignal plus a way to clear it. */
function deadline(ms) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), ms);
  return { signal: controller.signal, controller, clear: () => clearTimeout(timer) };
}

async function readCapped(response, limit) {
  if (!response.body) return "";
  const reader = response.body.getReader();
  const chunks = [];
  let size = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      throw new ApiError(response.status, `the reply is larger than ${limit / 1048576} MiB`);
    }
    chunks.push(value);
  }
  const all = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    all.set(chunk, at);
    at += chunk.byteLength;
  }
  return new TextDecoder().decode(all);
}

/**
 * One call: `path` relative to /flockparse/v1/ (e.g. "vram_report?node=..."). Resolves to the parsed
 * JSON; rejects with AuthNeeded or ApiError (one line). The whole call, body included, has `timeoutMs`.
 */
export async function api(path, { method = "GET", body, timeoutMs = READ_TIMEOUT_MS } = {}) {
  const limit = deadline(timeoutMs);
  const what = path.split("?")[0];
  try {
    const init = {
      method,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      signal: limit.signal,
      redirect: "error",
      cache: "no-store",
      credentials: "omit",
    };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(new URL(path, API), init);
    const text = await readCapped(response, REPLY_MAX_BYTES);
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      throw new ApiError(response.status, `${what}: the reply is not JSON (HTTP ${response.status})`);
    }
    const message = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
    if (response.status === 401) throw new AuthNeeded(message);
    if (!response.ok) throw new ApiError(response.status, message);
    return data;
  } catch (error) {
    if (error instanceof AuthNeeded || error instanceof ApiError) throw error;
    if (limit.signal.aborted) throw new ApiError(0, `${what}: no answer within ${timeoutMs / 1000} s`);
    throw new ApiError(0, `${what}: the server cannot be reached`);
  } finally {
    limit.clear();
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The event stream, reconnected with back-off (1 s doubling to 30 s, reset once a stream says hello).
 * Callbacks: onHello(hello, resumed), onEvent(event), onState(state, detail) with state one of
 * "connecting", "live", "retrying" (detail: seconds), "token".
 * An idle deadline of three heartbeats ends a stream that went silent (a dead proxy, a sleeping laptop).
 */
export class EventStream {
  constructor({ onHello, onEvent, onState }) {
    this.onHello = onHello;
    this.onEvent = onEvent;
    this.onState = onState;
    this.lastId = "";
    this.stopped = false;
    this.tokenChanged = null; // resolves the wait after a 401
  }

  start() {
    this.run();
    return this;
  }

  /** The user gave a (new) token: reconnect now. */
  retryNow() {
    if (this.tokenChanged) this.tokenChanged();
  }

  async run() {
    let backoff = 1000;
    while (!this.stopped) {
      this.onState("connecting");
      try {
        await this.once(() => {
          backoff = 1000;
        });
      } catch (error) {
        if (error instanceof AuthNeeded) {
          this.onState("token", error.message);
          await new Promise((resolve) => {
            this.tokenChanged = resolve;
          });
          this.tokenChanged = null;
          continue;
        }
      }
      if (this.stopped) break;
      const wait = backoff + Math.random() * 250;
      this.onState("retrying", Math.round(wait / 1000));
      await sleep(wait);
      backoff = Math.min(backoff * 2, 30000);
    }
  }

  async once(connected) {
    const controller = new AbortController();
    let idle = null;
    const arm = (ms) => {
      clearTimeout(idle);
      idle = setTimeout(() => controller.abort(), ms);
    };
    arm(READ_TIMEOUT_MS); // until the headers and the hello
    try {
      const extra = { Accept: "text/event-stream" };
      if (this.lastId) extra["Last-Event-ID"] = this.lastId;
      const response = await fetch(new URL("events", API), {
        headers: headers(extra),
        signal: controller.signal,
        redirect: "error",
        cache: "no-store",
        credentials: "omit",
      });
      if (response.status === 401) {
        let message = "a token is needed";
        try {
          message = (await response.json()).error || message;
        } catch {
          /* not JSON: the generic line */
        }
        throw new AuthNeeded(message);
      }
      const type = response.headers.get("Content-Type") || "";
      if (!response.ok || !type.startsWith("text/event-stream") || !response.body) {
        throw new ApiError(response.status, `events: HTTP ${response.status}`);
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let idleMs = READ_TIMEOUT_MS;
      const frame = { event: "", data: [], id: null };
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        arm(idleMs);
        buffer += value;
        let cut;
        while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
          if (buffer[cut] === "\r" && cut === buffer.length - 1) break; // maybe half of a CRLF
          const line = buffer.slice(0, cut);
          buffer = buffer.slice(cut + (buffer.startsWith("\r\n", cut) ? 2 : 1));
          const hello = this.line(line, frame);
          if (hello) {
            idleMs = Math.max(1, Number(hello.heartbeat_s) || 15) * 3000;
            arm(idleMs);
            connected();
            this.onState("live");
          }
        }
        if (buffer.length > STREAM_LINE_MAX) throw new ApiError(0, "events: a line too long");
      }
    } finally {
      clearTimeout(idle);
      controller.abort();
    }
  }

  /** One line of the stream (the SSE rules); returns the hello when this line completed one. */
  line(line, frame) {
    if (line === "") {
      const data = frame.data.join("\n");
      const kind = frame.event || "message";
      if (frame.id !== null) this.lastId = frame.id;
      frame.event = "";
      frame.data = [];
      frame.id = null;
      if (!data) return null;
      let parsed;
      try {
        parsed = JSON.parse(data);
      } catch {
        return null; // not ours: ignored, as EventSource ignores what it cannot use
      }
      if (kind === "hello") {
        this.onHello(parsed);
        return parsed;
      }
      if (kind === "message") this.onEvent(parsed);
      return null;
    }
    if (line.startsWith(":")) return null; // a keepalive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") frame.data.push(value);
    else if (field === "event") frame.event = value;
    else if (field === "id" && !value.includes("\0")) frame.id = value;
    return null;
  }
}
