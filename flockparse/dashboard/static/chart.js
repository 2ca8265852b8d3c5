// The last day's placement per model as inline SVG: time on x, one band per node, each cell coloured by
// where the model was (the history's timeline: the worst state seen in that cell wins).

import { duration, h, s, shortUrl } from "./dom.js";

export const CATEGORIES = [
  ["gpu", "GPU"],
  ["split", "split"],
  ["cpu", "CPU"],
  ["not_loaded", "not loaded"],
  ["offline", "node offline"],
  ["unknown", "not recorded"],
];
const LABEL = Object.fromEntries(CATEGORIES);
const ROW = 22;
const GAP = 6;
const AXIS = 20;

export function legend() {
  return CATEGORIES.map(([key, label]) =>
    h("span", { class: "key" }, h("span", { class: ["swatch", `c-${key}`] }), label),
  );
}

/** Pairs of the history summary grouped by model, nodes in the cluster's order. */
export function byModel(summary, nodeOrder) {
  const models = new Map();
  for (const pair of summary.models || []) {
    if (!models.has(pair.model)) models.set(pair.model, []);
    models.get(pair.model).push(pair);
  }
  const rank = (node) => {
    const i = nodeOrder.indexOf(node);
    return i < 0 ? nodeOrder.length : i;
  };
  for (const pairs of models.values()) pairs.sort((a, b) => rank(a.node) - rank(b.node));
  return [...models.entries()].sort((a, b) => a[0].localeCompare(b[0]));
}

/** Runs of equal cells: [[category, first, count], ...]. */
function runs(timeline) {
  const out = [];
  timeline.forEach((category, i) => {
    const last = out[out.length - 1];
    if (last && last[0] === category) last[2] += 1;
    else out.push([category, i, 1]);
  });
  return out;
}

function when(summary, index, cells) {
  const span = (summary.until - summary.since) / cells;
  const at = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  return `${at(summary.since + index * span)}`;
}

/** A tick's distance from now: 24h, 90m. */
function ago(seconds) {
  return seconds >= 7200 ? `${Math.round(seconds / 3600)}h` : `${Math.round(seconds / 60)}m`;
}

/** One model's chart, `width` pixels wide. */
export function modelChart(model, pairs, summary, width) {
  const labelWidth = Math.min(170, Math.max(90, Math.round(width * 0.3)));
  const plot = Math.max(60, width - labelWidth - 8);
  const height = pairs.length * (ROW + GAP) + AXIS;
  const svg = s("svg", {
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `${model}: placement per node over the last ${duration(summary.until - summary.since)}`,
    class: "chart",
  });
  pairs.forEach((pair, row) => {
    const y = row * (ROW + GAP);
    svg.append(
      s("text", { x: 0, y: y + ROW / 2 + 4, class: "row-label" }, shortUrl(pair.node)),
      s("rect", { x: labelWidth, y, width: plot, height: ROW, class: "c-track" }),
    );
    const cells = pair.timeline.length || 1;
    for (const [category, first, count] of runs(pair.timeline)) {
      if (category === "unknown") continue;
      const x = labelWidth + (first / cells) * plot;
      const w = (count / cells) * plot;
      svg.append(
        s(
          "rect",
          { x: x.toFixed(1), y, width: Math.max(w, 1).toFixed(1), height: ROW, class: `c-${category}` },
          s("title", {}, `${shortUrl(pair.node)}: ${LABEL[category] || category} from ${when(summary, first, cells)} to ${when(summary, first + count, cells)}`),
        ),
      );
    }
  });
  const axisY = pairs.length * (ROW + GAP) + 12;
  const span = summary.until - summary.since;
  const ticks = plot < 320 ? [0, 2, 4] : [0, 1, 2, 3, 4];
  for (const i of ticks) {
    const x = labelWidth + (i / 4) * plot;
    const text = i === 4 ? "now" : `−${ago(span * (1 - i / 4))}`;
    svg.append(s("text", { x, y: axisY, class: ["axis", i === 0 ? "start" : i === 4 ? "end" : "mid"] }, text));
  }
  return svg;
}

/** The line under a chart: shares over the window, moves and fallbacks. */
export function modelFacts(pairs) {
  const seconds = {};
  let moves = 0;
  let fallbacks = 0;
  let failed = 0;
  for (const pair of pairs) {
    for (const [key, value] of Object.entries(pair.seconds || {})) {
      if (key !== "unknown") seconds[key] = (seconds[key] || 0) + value;
    }
    moves += pair.moves || 0;
    fallbacks += pair.fallbacks || 0;
    failed += pair.failed_moves || 0;
  }
  const total = Object.values(seconds).reduce((a, b) => a + b, 0);
  const parts = [];
  for (const [key, label] of CATEGORIES) {
    if (!(total > 0 && seconds[key] > 0)) continue;
    const share = (100 * seconds[key]) / total;
    parts.push(`${label} ${share < 1 ? "<1" : Math.round(share)}%`);
  }
  parts.push(`${moves} move${moves === 1 ? "" : "s"}`);
  if (failed) parts.push(`${failed} failed`);
  if (fallbacks) parts.push(`${fallbacks} fallback${fallbacks === 1 ? "" : "s"} to CPU`);
  return parts.join(" · ");
}
