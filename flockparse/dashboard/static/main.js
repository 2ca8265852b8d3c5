// The dashboard: what the control API says, kept current by its event stream.
//
// Live without a polling storm: an event refetches only what it concerns. A node's events: that node's
// vram_report, the nodes of 250 ms of events together in one read (a whole report past 40 nodes);
// optimizer events: the optimizer; moves: the history, at most every 5 s; the balancer's statistics at
// most every 2 s. A full refresh every 30 s is the safety net; a stream that resumes on the same serve
// without a gap needs no refresh at all.

import { ApiError, AuthNeeded, EventStream, api, setToken, token } from "./api.js";
import { byModel, legend, modelChart, modelFacts } from "./chart.js";
import { clock, duration, fill, h, mb, ms, shortUrl } from "./dom.js";

const FULL_REFRESH_MS = 30000;
const STATS_POLL_MS = 5000; // requests make no events: the statistics are read this often while shown
const STATS_POLL_MAX_NODES = 500; // beyond, an lb_stats reply is large: the 30 s refresh only
const RESULT_SHOWN_MS = 60000; // a button's result stays this long, then the row speaks for itself
const NODE_GAP_MS = 250;
const NODES_PER_READ = 40; // more nodes waiting than this: one whole vram_report instead
const STATS_GAP_MS = 2000;
const OPTIMIZER_GAP_MS = 250;
const HISTORY_GAP_MS = 5000;
const HISTORY_WINDOWS = ["15m", "1h", "6h", "24h"]; // the last day by default
const HISTORY_BUCKETS = 96;
const EVENTS_KEPT = 60;
const RENDER_DELAY_MS = 40;
const ACTIONS = [
  ["force_gpu", "GPU", "moving to GPU…"],
  ["force_cpu", "CPU", "moving to CPU…"],
  ["unload", "Unload", "unloading…"],
];
const QUIET_KINDS = new Set(["pass_started", "placements_changed", "vram_measured"]);
const NODE_KINDS = new Set(["node_up", "node_down", "node_restarted", "gpu_lost", "gpu_back", "node_added", "node_removed"]);
const MOVE_KINDS = new Set(["move_finished", "move_failed", "model_unloaded", "models_restored", "pass_finished"]);

const state = {
  status: null, // GET status: nodes, priorities, time bounds, instance
  order: [], // node URLs, the cluster's order
  report: new Map(), // node -> its vram_report entry
  stats: new Map(), // node -> its lb_stats entry
  statsAt: null,
  routing: null,
  optimizer: null,
  optimizerAt: 0, // performance.now() when `optimizer` was read (next_pass_in counts down from there)
  history: null,
  historyNote: "",
  historyWindow: "24h",
  events: [],
  actions: new Map(), // "node\nmodel" -> {running?, message, ok}
  cleanups: new Map(), // node -> {running?, message, ok}: its "free VRAM" button
  errors: {}, // section -> one line
  instance: null,
  lastSeq: 0, // the newest event seen (the stream's numbering)
  refreshedSeq: 0, // events up to this one are in what the last full refresh read
  lastFull: -Infinity,
  connection: ["connecting"],
};

// -------------------------------------------------------------------------------------- coalescing
/** At most one run per key per `gap` ms; a request during a run queues exactly one more. */
class Throttle {
  constructor(gap, run) {
    this.gap = gap;
    this.run = run;
    this.keys = new Map();
  }

  request(key = "") {
    let slot = this.keys.get(key);
    if (!slot) {
      slot = { last: -Infinity, timer: null, running: false, again: false };
      this.keys.set(key, slot);
    }
    if (slot.running) {
      slot.again = true;
      return;
    }
    if (slot.timer !== null) return;
    const wait = Math.max(0, slot.last + this.gap - performance.now());
    slot.timer = setTimeout(() => this.fire(key, slot), wait);
  }

  async fire(key, slot) {
    slot.timer = null;
    slot.running = true;
    slot.last = performance.now();
    try {
      await this.run(key);
    } finally {
      slot.running = false;
      if (slot.again) {
        slot.again = false;
        this.request(key);
      }
    }
  }
}

// -------------------------------------------------------------------------------------- reads
/** Run a read for `section`; its failure is shown in that section, the last data stays. */
async function read(section, path, use) {
  try {
    use(await api(path));
    delete state.errors[section];
  } catch (error) {
    if (error instanceof AuthNeeded) askToken(error.message);
    state.errors[section] = error.message;
    if (!(error instanceof ApiError) && !(error instanceof AuthNeeded)) console.error(error);
  }
  dirty(section);
}

function useStatus(status) {
  state.status = status;
  state.order = status.nodes || [];
  state.refreshedSeq = Math.max(state.refreshedSeq, status.event_seq || 0);
  useOptimizer(status.optimizer);
  for (const url of [...state.report.keys()]) if (!state.order.includes(url)) state.report.delete(url);
  dirty("nodes", "summary", "foot");
}

function useReport(entries) {
  for (const entry of entries) {
    state.report.set(entry.node, entry);
    dirtyNode(entry.node);
  }
  dirty("summary");
}

function useStats(stats) {
  state.stats = new Map((stats.nodes || []).map((n) => [n.node, n]));
  state.statsAt = Date.now() / 1000;
  if (stats.optimizer) useOptimizer(stats.optimizer);
}

function useOptimizer(optimizer) {
  if (!optimizer) return;
  state.optimizer = optimizer;
  state.optimizerAt = performance.now();
  dirty("optimizer");
}

async function fullRefresh() {
  state.lastFull = performance.now();
  await read("nodes", "status", useStatus);
  if (!state.status) return;
  await Promise.all([
    read("nodes", "vram_report", useReport),
    read("stats", "lb_stats", useStats),
    read("stats", "routing", (r) => {
      state.routing = r.routing;
    }),
    refreshHistory(),
  ]);
}

async function refreshHistory() {
  try {
    state.history = await api(`history?since=${state.historyWindow}&buckets=${HISTORY_BUCKETS}`);
    state.historyNote = "";
  } catch (error) {
    if (error instanceof AuthNeeded) askToken(error.message);
    if (error instanceof ApiError && error.status === 404) state.history = null;
    state.historyNote = error.message;
  }
  dirty("history");
}

const waitingNodes = new Set(); // nodes whose events came since their last read
const nodeReads = new Throttle(NODE_GAP_MS, () => {
  const nodes = [...waitingNodes].filter((url) => state.order.includes(url));
  waitingNodes.clear();
  if (!nodes.length) return null;
  const query = nodes.map((url) => `node=${encodeURIComponent(url)}`).join("&");
  return read("nodes", nodes.length > NODES_PER_READ ? "vram_report" : `vram_report?${query}`, useReport);
});

function refreshNode(url) {
  waitingNodes.add(url);
  nodeReads.request();
}
const statsReads = new Throttle(STATS_GAP_MS, () => read("stats", "lb_stats", useStats));
const optimizerReads = new Throttle(OPTIMIZER_GAP_MS, () => read("optimizer", "optimizer", useOptimizer));
const historyReads = new Throttle(HISTORY_GAP_MS, refreshHistory);
const statusReads = new Throttle(1000, () => read("nodes", "status", useStatus));
const fullReads = new Throttle(1000, fullRefresh);

// -------------------------------------------------------------------------------------- events
function onEvent(event) {
  if (typeof event !== "object" || event === null) return;
  if (typeof event.seq === "number") state.lastSeq = Math.max(state.lastSeq, event.seq);
  if (!QUIET_KINDS.has(event.kind) && !(event.kind === "pass_finished" && !event.data?.moved && !event.data?.failed && !event.data?.undone)) {
    state.events.unshift(event);
    state.events.length = Math.min(state.events.length, EVENTS_KEPT);
    dirty("events");
  }
  if (typeof event.seq === "number" && event.seq <= state.refreshedSeq) return; // read already
  const kind = String(event.kind || "");
  if (event.node && state.order.includes(event.node)) refreshNode(event.node);
  if (kind === "node_added" || kind === "node_removed") statusReads.request();
  if (kind.startsWith("pass_") || kind.startsWith("optimizer_") || MOVE_KINDS.has(kind)) optimizerReads.request();
  if (MOVE_KINDS.has(kind) || kind === "placements_changed") historyReads.request();
  if (NODE_KINDS.has(kind) || MOVE_KINDS.has(kind)) statsReads.request();
}

function onHello(hello) {
  const sameRun = hello.instance === state.instance;
  if (!sameRun && state.instance) {
    // the serve restarted: the events shown are the old run's
    state.events = [{ kind: "serve_restarted", time: Date.now() / 1000, message: "the serve restarted: events from here on are its new run's" }];
    dirty("events");
  }
  if (!sameRun || hello.seq !== state.lastSeq) {
    // another run of the serve, or events we will never get: what we show may be wrong, read it all
    state.instance = hello.instance;
    state.lastSeq = hello.seq;
    state.refreshedSeq = 0;
    fullReads.request();
  }
}

function onConnection(kind, detail) {
  state.connection = [kind, detail];
  if (kind === "token") askToken(detail);
  dirty("connection");
}

// -------------------------------------------------------------------------------------- actions
async function act(node, model, action) {
  const key = `${node}\n${model}`;
  if (state.actions.get(key)?.running) return;
  const [, , doing] = ACTIONS.find(([name]) => name === action);
  state.actions.set(key, { running: action, message: doing, ok: null });
  dirtyNode(node);
  const seconds = Number(state.status?.operation_timeout_s) || 1800;
  try {
    const reply = await api(action, {
      method: "POST",
      body: { model, nodes: [node] },
      timeoutMs: seconds * 1000 + 5000,
    });
    const entry = (Array.isArray(reply) && (reply.find((r) => r.node === node) || reply[0])) || null;
    const result = entry && entry.result ? entry.result : {};
    state.actions.set(key, { message: String(result.message ?? "done"), ok: result.success === true, at: performance.now() });
  } catch (error) {
    if (error instanceof AuthNeeded) askToken(error.message);
    state.actions.set(key, { message: error.message, ok: false, at: performance.now() });
  }
  dirtyNode(node);
  refreshNode(node);
}

/** Results older than RESULT_SHOWN_MS go: a row's placement then speaks for itself (a model unloaded from
 * the page keeps its "not loaded" row, without the old message). */
function forgetOldResults() {
  const now = performance.now();
  for (const [key, action] of state.actions) {
    if (!action.running && action.at !== undefined && now - action.at > RESULT_SHOWN_MS && action.message) {
      state.actions.set(key, { ok: action.ok, at: action.at, message: "" });
      dirtyNode(key.split("\n")[0]);
    }
  }
  for (const [node, done] of state.cleanups) {
    if (!done.running && done.at !== undefined && now - done.at > RESULT_SHOWN_MS) {
      state.cleanups.delete(node);
      dirtyNode(node);
    }
  }
}

async function cleanup(node) {
  if (state.cleanups.get(node)?.running) return;
  state.cleanups.set(node, { running: true, message: "unloading what is not a priority…", ok: null });
  dirtyNode(node);
  const seconds = Number(state.status?.operation_timeout_s) || 1800;
  try {
    const reply = await api("cleanup", { method: "POST", body: { nodes: [node] }, timeoutMs: seconds * 1000 + 5000 });
    const rows = Array.isArray(reply) ? reply : [];
    const done = rows.filter((r) => r.result?.success).map((r) => r.model);
    const left = rows.filter((r) => !r.result?.success).map((r) => String(r.result?.message ?? r.model));
    const said = done.length ? `unloaded ${done.join(", ")}` : left.length ? "" : "nothing to unload: every model in VRAM is a priority";
    state.cleanups.set(node, { message: [said, ...left].filter(Boolean).join("; "), ok: left.length === 0, at: performance.now() });
  } catch (error) {
    if (error instanceof AuthNeeded) askToken(error.message);
    state.cleanups.set(node, { message: error.message, ok: false, at: performance.now() });
  }
  dirtyNode(node);
  refreshNode(node);
}

// -------------------------------------------------------------------------------------- token
const form = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");
let stream = null;

function askToken(message) {
  document.getElementById("token-error").textContent = token() ? message || "wrong token" : "";
  if (form.hidden) {
    form.hidden = false;
    tokenInput.focus();
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const value = tokenInput.value.trim();
  if (!value) return;
  setToken(value);
  tokenInput.value = "";
  form.hidden = true;
  if (stream) stream.retryNow();
  fullReads.request();
});

// -------------------------------------------------------------------------------------- rendering
const sections = {
  summary: renderSummary,
  connection: renderConnection,
  nodes: renderNodes,
  optimizer: renderOptimizer,
  events: renderEvents,
  stats: renderStats,
  history: renderHistory,
  foot: renderFoot,
};
const dirtySections = new Set();
const dirtyNodes = new Set();
let renderTimer = null;

function dirty(...names) {
  for (const name of names) dirtySections.add(name);
  schedule();
}

function dirtyNode(url) {
  dirtyNodes.add(url);
  schedule();
}

function schedule() {
  if (renderTimer === null) renderTimer = setTimeout(render, RENDER_DELAY_MS);
}

function render() {
  renderTimer = null;
  const names = [...dirtySections];
  dirtySections.clear();
  for (const name of names) sections[name]();
  if (!names.includes("nodes") && dirtyNodes.size) renderNodes(new Set(dirtyNodes));
  dirtyNodes.clear();
}

function sectionError(name) {
  return state.errors[name] ? h("p", { class: "section-error", role: "alert" }, state.errors[name]) : null;
}

function renderSummary() {
  const entries = state.order.map((url) => state.report.get(url)).filter(Boolean);
  const online = entries.filter((e) => e.online === true).length;
  const gpu = entries.filter((e) => e.gpu === "yes").length;
  const lost = entries.filter((e) => e.gpu === "lost").length;
  const priorities = state.status?.priority_models || [];
  fill(
    document.getElementById("summary"),
    h("span", { class: "count" }, `${state.order.length} node${state.order.length === 1 ? "" : "s"}`),
    h("span", { class: ["count", online < state.order.length ? "bad" : "good"] }, `${online} online`),
    h("span", { class: "count" }, `${gpu} with GPU`),
    lost ? h("span", { class: "count bad" }, `${lost} GPU lost`) : null,
    h("span", { class: "count dim" }, `priority: ${priorities.join(", ") || "none"}`),
  );
}

function renderConnection() {
  const [kind, detail] = state.connection;
  const el = document.getElementById("connection");
  el.dataset.state = kind;
  el.textContent = {
    connecting: "connecting…",
    live: "live",
    retrying: `reconnecting in ${detail}s…`,
    token: "token needed",
  }[kind];
}

const cards = new Map(); // node -> its <article>

function renderNodes(only = null) {
  const container = document.getElementById("nodes");
  if (only === null) {
    const wanted = new Set(state.order);
    for (const [url, card] of cards) {
      if (!wanted.has(url)) {
        card.remove();
        cards.delete(url);
      }
    }
  }
  if (only !== null && [...only].some((url) => state.order.includes(url) && !cards.has(url))) {
    return renderNodes(null); // a node without a card yet: the list itself changes
  }
  const urls = only === null ? state.order : state.order.filter((url) => only.has(url));
  for (const url of urls) {
    const old = cards.get(url);
    const signature = cardSignature(url);
    if (old && old.dataset.signature === signature) continue; // unchanged: a button under the pointer stays
    const card = nodeCard(url);
    card.dataset.signature = signature;
    if (old) old.replaceWith(card);
    cards.set(url, card);
  }
  if (only === null) {
    const error = sectionError("nodes");
    container.replaceChildren(...(error ? [error] : []), ...state.order.map((url) => cards.get(url)));
    if (!state.order.length && state.status) container.append(h("p", { class: "dim" }, "No nodes."));
  }
}

/** What a node's card shows, as one string: the card is rebuilt only when it changes. */
function cardSignature(url) {
  const { last_seen: _seen, vram_scraped_at: _scraped, ...shown } = state.report.get(url) || {};
  const actions = [...state.actions].filter(([key]) => key.startsWith(`${url}\n`));
  return JSON.stringify([shown, actions, state.cleanups.get(url) || null, state.status?.priority_models || []]);
}

function gpuBadge(entry) {
  const words = { yes: "GPU", no: "no GPU", unknown: "GPU unknown", lost: "GPU LOST" };
  return h("span", { class: ["badge", `gpu-${entry.gpu}`], title: entry.gpu_evidence || "" }, words[entry.gpu] || entry.gpu || "?");
}

function nodeCard(url) {
  const entry = state.report.get(url) || { node: url, online: null, models: [] };
  const online = entry.online === true ? "online" : entry.online === false ? "offline" : "unchecked";
  return h(
    "article",
    { class: ["node", online], data: { node: url } },
    h(
      "header",
      { class: "node-head" },
      h("span", { class: ["dot", online], title: online, "aria-label": online }),
      h("h3", { class: "node-name" }, shortUrl(url)),
      h("span", { class: ["badge", online] }, online),
      entry.online !== null ? gpuBadge(entry) : null,
      entry.ollama_version ? h("span", { class: "badge version", title: "Ollama version" }, `Ollama ${entry.ollama_version}`) : null,
      typeof entry.latency_ms === "number" && entry.online === true ? h("span", { class: "badge dim" }, ms(entry.latency_ms)) : null,
      entry.stale ? h("span", { class: "badge warn", title: "the last check did not answer in time" }, "stale") : null,
    ),
    entry.error ? h("p", { class: "node-error" }, entry.error) : null,
    entry.gpu_evidence ? h("p", { class: "evidence dim" }, entry.gpu_evidence) : null,
    vramBar(entry),
    modelList(url, entry),
    cleanupRow(url, entry),
  );
}

function cleanupRow(url, entry) {
  const done = state.cleanups.get(url);
  if (entry.online !== true && !done) return null;
  return h(
    "div",
    { class: "node-actions" },
    h(
      "button",
      {
        type: "button",
        class: ["act", "cleanup", done?.running ? "running" : ""],
        disabled: Boolean(done?.running),
        title: `unload every model that is not a priority from the VRAM of ${shortUrl(url)}`,
        onclick: () => cleanup(url),
      },
      "Free VRAM",
    ),
    done ? h("span", { class: ["result", done.running ? "running" : done.ok ? "ok" : "failed"], role: "status" }, done.message) : null,
  );
}

function vramBar(entry) {
  const models = entry.models || [];
  const held = models.reduce((sum, m) => sum + (m.vram_mb || 0), 0);
  const total = entry.vram_total_mb;
  if (typeof total === "number" && total > 0) {
    const ollama = entry.vram_ollama_mb ?? held;
    const other = entry.vram_other_mb || 0;
    const reserved = entry.vram_reserved_mb || 0;
    const free = entry.vram_free_mb ?? Math.max(0, total - ollama - other - reserved);
    const part = (value, cls, label) =>
      value > 0 ? h("span", { class: ["seg", cls], title: `${label}: ${mb(value)}`, style: { width: `${(100 * value) / total}%` } }) : null;
    const source = entry.vram_format ? ` (${entry.vram_format}${entry.vram_stale ? ", stale" : ""})` : "";
    return h(
      "div",
      { class: "vram" },
      h("div", { class: "bar", role: "img", "aria-label": `VRAM: ${mb(ollama)} Ollama, ${mb(other)} other, ${mb(free)} free of ${mb(total)}` },
        part(ollama, "ollama", "Ollama"), part(other, "other", "other programs"), part(reserved, "reserved", "reserved")),
      h("p", { class: "vram-text" },
        h("span", { class: "key" }, h("span", { class: "swatch ollama" }), `Ollama ${mb(ollama)}`),
        h("span", { class: "key" }, h("span", { class: "swatch other" }), `other ${mb(other)}`),
        h("span", { class: "key" }, h("span", { class: "swatch free" }), `free ${mb(free)}`),
        h("span", { class: "dim" }, `of ${mb(total)}${source}`)),
      entry.vram_error ? h("p", { class: "node-error" }, `GPU exporter: ${entry.vram_error}`) : null,
    );
  }
  if (entry.has_gpu !== true && held <= 0) return null; // no GPU, or none known and none in use
  return h(
    "div",
    { class: "vram" },
    h("p", { class: "vram-text" }, `${mb(held)} of VRAM held by its models`, h("span", { class: "dim" }, " (total unknown: no GPU exporter)")),
  );
}

function withTag(name) {
  return name.includes(":") ? name : `${name}:latest`;
}

function globRegex(pattern) {
  const body = pattern.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(`^${body}$`);
}

function isPriority(name) {
  const patterns = state.status?.priority_models || [];
  return patterns.some((p) =>
    /[*?]/.test(p) ? globRegex(p).test(name) || globRegex(p).test(withTag(name)) : withTag(p) === withTag(name),
  );
}

function placementClass(model) {
  if (model.gpu_percent >= 100) return "gpu";
  if (model.gpu_percent > 0) return "split";
  return "cpu";
}

function modelList(url, entry) {
  const models = [...(entry.models || [])];
  const shown = new Set(models.map((m) => m.name));
  for (const key of state.actions.keys()) {
    const [node, model] = key.split("\n");
    if (node === url && !shown.has(model)) {
      models.push({ name: model, ghost: true });
      shown.add(model);
    }
  }
  if (!models.length) return h("p", { class: "models-empty dim" }, entry.online === false ? "" : "No model loaded.");
  return h("ul", { class: "models" }, models.map((model) => modelRow(url, model)));
}

function modelRow(url, model) {
  const action = state.actions.get(`${url}\n${model.name}`);
  const busy = Boolean(action?.running);
  const where = model.ghost ? "not loaded" : model.location || "?";
  const cls = model.ghost ? "none" : placementClass(model);
  const fixed = model.controllable === false;
  return h(
    "li",
    { class: ["model", `at-${cls}`], data: { node: url, model: model.name } },
    h("div", { class: "model-name" }, isPriority(model.name) ? h("span", { class: "star", title: "priority model" }, "★ ") : null, model.name),
    h(
      "div",
      { class: "model-where" },
      h("span", { class: ["place", `at-${cls}`] }, where),
      model.ghost ? null : h("span", { class: "gpu-bar", title: `${model.gpu_percent}% on GPU` }, h("span", { class: "fill", style: { width: `${model.gpu_percent || 0}%` } })),
      model.ghost ? null : h("span", { class: "dim size" }, `${mb(model.size_mb)}${model.vram_mb ? ` · ${mb(model.vram_mb)} VRAM` : ""}`),
      model.stopping ? h("span", { class: "badge warn" }, "stopping") : null,
    ),
    h(
      "div",
      { class: "model-actions" },
      ACTIONS.map(([name, label]) =>
        h(
          "button",
          {
            type: "button",
            class: ["act", name, action?.running === name ? "running" : ""],
            data: { action: name },
            disabled: busy || (fixed && name !== "unload"),
            title: fixed && name !== "unload" ? "MLX model: Ollama places it" : `${label}: ${model.name} on ${shortUrl(url)}`,
            onclick: () => act(url, model.name, name),
          },
          label,
        ),
      ),
      action?.message ? h("span", { class: ["result", action.running ? "running" : action.ok ? "ok" : "failed"], role: "status" }, action.message) : null,
    ),
  );
}

function renderOptimizer() {
  const o = state.optimizer;
  const el = document.getElementById("optimizer");
  if (!o) return fill(el, sectionError("optimizer"), h("p", { class: "dim" }, "…"));
  const last = o.last_pass;
  const list = (items, format, empty) =>
    items && items.length ? h("ul", { class: "plain" }, items.map((item) => h("li", {}, format(item)))) : h("span", { class: "dim" }, empty);
  fill(
    el,
    sectionError("optimizer"),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "State"),
      h("dd", {}, h("span", { class: ["badge", o.running ? "online" : "offline"] }, o.running ? "running" : "stopped")),
      h("dt", {}, "Interval"),
      h("dd", {}, duration(o.interval)),
      h("dt", {}, "Next pass"),
      h("dd", { id: "next-pass" }, nextPassText()),
      h("dt", {}, "Last pass"),
      h(
        "dd",
        {},
        last
          ? `${clock(last.started_at)}: ${last.moved} moved, ${last.failed} failed, ${last.skipped} skipped, ${last.checked_nodes} node(s), ${last.duration_s} s${last.cancelled ? " (cancelled)" : ""}`
          : "none yet",
      ),
      h("dt", {}, "Priority"),
      h("dd", {}, (state.status?.priority_models || []).join(", ") || h("span", { class: "dim" }, "none")),
      h("dt", {}, "Pinned to CPU"),
      h("dd", {}, list(o.pinned_cpu, (p) => `${p.model} on ${shortUrl(p.node)}`, "none")),
      h("dt", {}, "Backed off"),
      h(
        "dd",
        {},
        list(
          o.backed_off,
          (b) => `${b.model} on ${shortUrl(b.node)}: ${b.reason}${b.passes_to_skip ? `, skips ${b.passes_to_skip} pass(es)` : ""}`,
          "none",
        ),
      ),
    ),
  );
}

function nextPassText() {
  const o = state.optimizer;
  if (!o || !o.running || typeof o.next_pass_in !== "number") return "–";
  const left = o.next_pass_in - (performance.now() - state.optimizerAt) / 1000;
  return left > 0 ? `in ${duration(left)}` : "due";
}

function renderEvents() {
  const el = document.getElementById("events");
  if (!state.events.length) return fill(el, h("li", { class: "dim" }, "Nothing yet: events appear here as they happen."));
  fill(
    el,
    state.events.map((event) =>
      h(
        "li",
        { class: ["event", `k-${String(event.kind).replace(/[^a-z_]/g, "")}`], data: { kind: event.kind, seq: event.seq } },
        h("time", {}, clock(event.time)),
        h("span", { class: "kind" }, String(event.kind).replace(/_/g, " ")),
        h("span", { class: "message" }, event.message || ""),
      ),
    ),
  );
}

function renderStats() {
  const el = document.getElementById("stats");
  const rows = state.order.map((url) => [url, state.stats.get(url)]).filter(([, s]) => s);
  const cell = (v) => h("td", {}, v === null || v === undefined ? "–" : String(v));
  fill(
    el,
    sectionError("stats"),
    h(
      "table",
      { class: "stats" },
      h("caption", {}, `routing: ${state.routing ?? "–"} · as of ${clock(state.statsAt)}`),
      h("thead", {}, h("tr", {}, ["Node", "Requests", "Errors", "In flight", "p50", "p95", "TTFT p50", "Tokens/s", "Models on GPU"].map((t) => h("th", { scope: "col" }, t)))),
      h(
        "tbody",
        {},
        rows.map(([url, s]) =>
          h(
            "tr",
            { data: { node: url } },
            h("th", { scope: "row" }, shortUrl(url)),
            cell(s.requests),
            cell(s.errors),
            cell(s.in_flight),
            cell(s.latency_p50_ms === null ? null : ms(s.latency_p50_ms)),
            cell(s.latency_p95_ms === null ? null : ms(s.latency_p95_ms)),
            cell(s.ttft_p50_ms === null ? null : ms(s.ttft_p50_ms)),
            cell(typeof s.tokens_per_s === "number" ? s.tokens_per_s.toFixed(1) : null),
            cell(`${s.models_on_gpu ?? 0} / ${s.models_loaded ?? 0}`),
          ),
        ),
      ),
    ),
  );
}

let legendDrawn = false;

function renderHistory() {
  const el = document.getElementById("history");
  if (!legendDrawn) {
    fill(document.getElementById("history-legend"), legend());
    legendDrawn = true;
  }
  fill(
    document.getElementById("history-window"),
    HISTORY_WINDOWS.map((name) =>
      h(
        "button",
        {
          type: "button",
          class: "win",
          data: { window: name },
          "aria-pressed": String(name === state.historyWindow),
          onclick: () => {
            state.historyWindow = name;
            dirty("history");
            refreshHistory();
          },
        },
        name,
      ),
    ),
  );
  if (!state.history) return fill(el, h("p", { class: "dim" }, state.historyNote || "…"));
  const groups = byModel(state.history, state.order);
  if (!groups.length) return fill(el, h("p", { class: "dim" }, "No placement recorded yet."));
  const width = Math.max(240, el.clientWidth - 2);
  fill(
    el,
    state.historyNote ? h("p", { class: "section-error" }, state.historyNote) : null,
    groups.map(([model, pairs]) =>
      h(
        "figure",
        { class: "model-history", data: { model } },
        h("figcaption", {}, h("strong", {}, model), " ", h("span", { class: "dim" }, modelFacts(pairs))),
        modelChart(model, pairs, state.history, width),
      ),
    ),
  );
}

function renderFoot() {
  const st = state.status;
  if (!st) return;
  fill(
    document.getElementById("foot"),
    `flockparse ${st.version} · running since ${new Date(st.started_at * 1000).toLocaleString()} · `,
    "live over the control API's event stream",
  );
}

// -------------------------------------------------------------------------------------- start
async function start() {
  dirty("connection", "events", "history");
  await fullRefresh();
  let retry = 2000;
  let tried = performance.now();
  while (!state.status) {
    // waiting for the token form (its submit reads at once), or the serve is not answering: try again,
    // 2 s doubling to 30 s
    await new Promise((resolve) => setTimeout(resolve, 250));
    if (form.hidden && !state.status && performance.now() - tried >= retry) {
      await fullRefresh();
      tried = performance.now();
      retry = Math.min(retry * 2, FULL_REFRESH_MS);
    }
  }
  state.instance = state.status.instance;
  const first = Math.max(0, (state.status.event_seq || 0) - EVENTS_KEPT);
  state.lastSeq = first; // the stream replays the recent events after this one, from its ring
  stream = new EventStream({ onHello, onEvent, onState: onConnection });
  stream.lastId = `${state.instance}-${first}`;
  stream.start();
  setInterval(() => {
    if (document.visibilityState !== "visible") return;
    if (performance.now() - state.lastFull >= FULL_REFRESH_MS) fullReads.request();
    else if (state.order.length <= STATS_POLL_MAX_NODES) statsReads.request();
    forgetOldResults();
  }, STATS_POLL_MS);
  setInterval(() => {
    const el = document.getElementById("next-pass");
    if (el) el.textContent = nextPassText();
  }, 1000);
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => dirty("history"), 200);
  });
}

start();
