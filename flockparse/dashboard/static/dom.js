// Building the page without HTML strings: every text, a node's included, goes in as a text node
// (textContent), never parsed as markup. Attributes are set one by one; nothing is `innerHTML`.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/**
 * h("div", {class: "x", data: {node: url}, title: "t", onclick: f}, "text", child, [more])
 * Props: class, data (dataset), on* (listeners), style (an object: CSSOM, allowed by the CSP),
 * any other key as an attribute (false/null skip it, true sets it empty).
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  setProps(el, props);
  return append(el, children);
}

/** The same for SVG elements (their own namespace). */
export function s(tag, props = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setProps(el, props);
  return append(el, children);
}

function setProps(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "data") for (const [name, v] of Object.entries(value)) el.dataset[name] = String(v);
    else if (key === "style") for (const [name, v] of Object.entries(value)) el.style.setProperty(name, v);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

/** Replace the children of `el` (a section re-rendered as a whole). */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// ------------------------------------------------------------------------------------------ formats
/** Sizes as the console shows them: 705 MB, 4.7 GB. */
export function mb(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  return value >= 1024 ? `${(value / 1024).toFixed(1)} GB` : `${Math.round(value)} MB`;
}

/** 12s, 4m 12s, 2h 05m, 3d 4h. */
export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  const t = Math.max(0, Math.round(seconds));
  if (t < 60) return `${t}s`;
  if (t < 3600) return `${Math.floor(t / 60)}m ${String(t % 60).padStart(2, "0")}s`;
  if (t < 86400) return `${Math.floor(t / 3600)}h ${String(Math.floor((t % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(t / 86400)}d ${Math.floor((t % 86400) / 3600)}h`;
}

/** `http://127.0.0.1:11434` -> `127.0.0.1:11434`. */
export function shortUrl(url) {
  return typeof url === "string" ? url.replace(/^[a-z]+:\/\//i, "").replace(/\/$/, "") : "–";
}

export function clock(epochSeconds) {
  if (typeof epochSeconds !== "number") return "–";
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

export function ms(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${Math.round(value)} ms` : "–";
}
