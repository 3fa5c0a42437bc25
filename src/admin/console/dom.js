// DOM and formatting helpers. Everything the API says is put on the page as text
// (textContent), never as HTML, so a version or a reason can never inject markup.

/** Element `tag` with attributes/properties and children (strings become text nodes). */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  setProps(el, props);
  append(el, children);
  return el;
}

/** SVG element `tag` with attributes and children. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function setProps(el, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k in el) el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** The element with this id (throws if the page lacks it: a bug, not an input). */
export function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`console: no element #${id}`);
  return el;
}

/** Replaces the children of `el` in one step (no intermediate empty layout). */
export function fill(el, ...children) {
  const frag = document.createDocumentFragment();
  append(frag, children);
  el.replaceChildren(frag);
}

/** Sets `el`'s text only when it changed (keeps selections and avoids repaints). */
export function setText(el, text) {
  const t = String(text);
  if (el.textContent !== t) el.textContent = t;
}

/** An integer with thin grouping, or an en dash for null/undefined. */
export function num(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return '–';
  return Number(n).toLocaleString('en-US');
}

/** Milliseconds, with a precision that suits the size. */
export function ms(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return '–';
  const v = Number(x);
  if (v >= 1000) return `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)} s`;
  if (v >= 100) return `${v.toFixed(0)} ms`;
  if (v >= 10) return `${v.toFixed(1)} ms`;
  return `${v.toFixed(2)} ms`;
}

/** A duration in seconds as "1h 02m", "4m 05s", "12s". */
export function duration(secs) {
  if (secs === null || secs === undefined) return 'never';
  let t = Math.max(0, Math.floor(secs));
  const d = Math.floor(t / 86400); t -= d * 86400;
  const hh = Math.floor(t / 3600); t -= hh * 3600;
  const mm = Math.floor(t / 60); const ss = t - mm * 60;
  const p = (n) => String(n).padStart(2, '0');
  if (d > 0) return `${d}d ${p(hh)}h`;
  if (hh > 0) return `${hh}h ${p(mm)}m`;
  if (mm > 0) return `${mm}m ${p(ss)}s`;
  return `${ss}s`;
}

/** Unix seconds as local "HH:MM:SS" (with the date when not today). */
export function clock(unix) {
  if (unix === null || unix === undefined) return '–';
  const d = new Date(unix * 1000);
  const time = d.toLocaleTimeString('en-GB', { hour12: false });
  const today = new Date().toDateString() === d.toDateString();
  return today ? time : `${d.toISOString().slice(0, 10)} ${time}`;
}

/** A `<dl>` body from [term, value] pairs (value: string or Node). */
export function facts(dl, pairs) {
  fill(dl, pairs.filter(Boolean).map(([k, v]) => [h('dt', null, k), h('dd', null, v)]));
}

/** Shows `text` in a message box (`kind`: "error" | "ok" | ""), or hides it when empty. */
export function message(el, text, kind) {
  el.hidden = !text;
  el.className = `message ${kind || ''}`.trim();
  setText(el, text || '');
}

/** Whether the operator is selecting text inside `el` (a refresh would throw the selection away). */
export function selectingIn(el) {
  const sel = document.getSelection();
  return Boolean(sel && !sel.isCollapsed && sel.anchorNode && el.contains(sel.anchorNode));
}

/** A small button copying `text`; where the clipboard API is unavailable (a plain-http
 * address other than localhost), it selects `target`'s text for Ctrl+C instead. */
export function copyButton(text, target) {
  const b = h('button', { type: 'button', class: 'small copy' }, 'Copy');
  b.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(text);
      b.textContent = 'Copied';
    } catch (_) {
      const range = document.createRange();
      range.selectNodeContents(target);
      const sel = document.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      b.textContent = 'Selected: Ctrl+C';
    }
  });
  return b;
}
