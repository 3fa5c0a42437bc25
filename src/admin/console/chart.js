// Two small inline-SVG charts of /v1/timeline: decisions per slot (stacked bars) and backend
// time (p50/p99 lines). Drawn at the container's pixel size so text is never stretched; every
// slot carries a <title> with its exact figures (hover), the same numbers the JSON holds.

import { s, h, fill, clock, ms, num } from './dom.js';

/** Stack order, bottom to top, with legend labels. */
export const DECISION_KINDS = [
  ['admitted', 'admitted'],
  ['deny', 'refused: deny'],
  ['limited', 'refused: limited'],
  ['killswitch', 'refused: kill switch'],
  ['held_back', 'refused: held back'],
  ['ambiguous', 'refused: ambiguous (400)'],
];

const MARGIN = { left: 46, right: 10, top: 10, bottom: 22 };

/** The smallest of 1, 2, 5 × 10^k at or above `x` (at least 1). */
function niceCeil(x) {
  if (!(x > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

function frame(container) {
  const width = Math.max(300, Math.floor(container.clientWidth || 600));
  const height = Math.max(120, Math.floor(container.clientHeight || 210));
  const plot = {
    x: MARGIN.left,
    y: MARGIN.top,
    w: width - MARGIN.left - MARGIN.right,
    h: height - MARGIN.top - MARGIN.bottom,
  };
  const svg = s('svg', { viewBox: `0 0 ${width} ${height}`, width, height, role: 'img' });
  return { svg, plot, width, height };
}

function axes(svg, plot, slots, max, label) {
  for (const f of [0, 0.5, 1]) {
    const y = plot.y + plot.h - f * plot.h;
    svg.append(s('line', { x1: plot.x, x2: plot.x + plot.w, y1: y, y2: y, class: f === 0 ? 'axis' : 'grid' }));
    svg.append(s('text', { x: plot.x - 6, y: y + 4, 'text-anchor': 'end' }, label(max * f)));
  }
  const n = slots.length;
  for (const back of [n - 1, 60, 30, 0]) {
    const i = n - 1 - back;
    if (i < 0 || i >= n) continue;
    const x = plot.x + (i + 0.5) * (plot.w / n);
    const anchor = i === 0 ? 'start' : i === n - 1 ? 'end' : 'middle';
    svg.append(s('text', { x, y: plot.y + plot.h + 16, 'text-anchor': anchor }, clock(slots[i].t).slice(-8, -3)));
  }
}

function empty(svg, plot, text) {
  svg.append(s('text', { x: plot.x + plot.w / 2, y: plot.y + plot.h / 2, 'text-anchor': 'middle', class: 'empty' }, text));
}

function legend(el, items) {
  fill(el, items.map(([cls, text]) => h('span', null, h('span', { class: `swatch ${cls}` }), text)));
}

/** Stacked bars: admitted and each refusal kind per slot. */
export function drawDecisions(container, legendEl, timeline) {
  const slots = timeline.slots || [];
  const { svg, plot } = frame(container);
  const value = (slot, kind) => (kind === 'admitted' ? slot.admitted : (slot.refused || {})[kind]) || 0;
  let max = 0;
  for (const slot of slots) {
    max = Math.max(max, DECISION_KINDS.reduce((sum, [k]) => sum + value(slot, k), 0));
  }
  const top = niceCeil(max);
  axes(svg, plot, slots, top, (v) => num(Math.round(v)));
  const step = plot.w / Math.max(1, slots.length);
  const barW = Math.max(1, step - (step > 4 ? 1 : 0));
  slots.forEach((slot, i) => {
    const g = s('g', { class: 'slot' });
    const parts = DECISION_KINDS.filter(([k]) => value(slot, k) > 0)
      .map(([k, label]) => `${label} ${num(value(slot, k))}`);
    g.append(s('title', null, `${clock(slot.t)} (${timeline.slot_seconds || 10} s): ${parts.join(', ') || 'nothing'}`));
    g.append(s('rect', { x: plot.x + i * step, y: plot.y, width: step, height: plot.h, fill: 'transparent' }));
    let y = plot.y + plot.h;
    for (const [k] of DECISION_KINDS) {
      const v = value(slot, k);
      if (v <= 0) continue;
      const bh = Math.max(1, (v / top) * plot.h);
      y -= bh;
      g.append(s('rect', { x: plot.x + i * step, y, width: barW, height: bh, class: `bar fill-${k}`, 'data-value': v }));
    }
    svg.append(g);
  });
  if (max === 0) empty(svg, plot, 'no handshakes or requests in the last 15 minutes');
  container.replaceChildren(svg);
  legend(legendEl, DECISION_KINDS.map(([k, label]) => [`fill-${k}`, label]));
}

/** p50 and p99 lines (gaps where a slot had no samples), backend errors as dots on top. */
export function drawBackend(container, legendEl, timeline) {
  const slots = timeline.slots || [];
  const { svg, plot } = frame(container);
  let max = 0;
  for (const slot of slots) {
    for (const v of [slot.backend_p50_ms, slot.backend_p99_ms]) if (v !== null && v !== undefined) max = Math.max(max, v);
  }
  const top = niceCeil(max);
  axes(svg, plot, slots, top, (v) => (v === 0 ? '0' : ms(v)));
  const step = plot.w / Math.max(1, slots.length);
  const xy = (i, v) => [plot.x + (i + 0.5) * step, plot.y + plot.h - (v / top) * plot.h];
  for (const [field, cls] of [['backend_p50_ms', 'line-p50'], ['backend_p99_ms', 'line-p99']]) {
    let d = '';
    let pen = false;
    slots.forEach((slot, i) => {
      const v = slot[field];
      if (v === null || v === undefined) { pen = false; return; }
      const [x, y] = xy(i, v);
      d += `${pen ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)} `;
      pen = true;
    });
    if (d) svg.append(s('path', { d, class: `line ${cls}` }));
    // Every sample gets a hover target; one between two gaps would be invisible as a path,
    // so it is drawn as a dot.
    const has = (i) => i >= 0 && i < slots.length && slots[i][field] !== null && slots[i][field] !== undefined;
    slots.forEach((slot, i) => {
      if (!has(i)) return;
      const v = slot[field];
      const [x, y] = xy(i, v);
      const alone = !has(i - 1) && !has(i + 1);
      const dot = s('circle', { cx: x, cy: y, r: alone ? 2.5 : 4, class: `point ${cls}`, 'fill-opacity': alone ? 1 : 0 });
      dot.append(s('title', null, `${clock(slot.t)}: ${field === 'backend_p50_ms' ? 'p50' : 'p99'} ${ms(v)}`));
      svg.append(dot);
    });
  }
  slots.forEach((slot, i) => {
    if (!(slot.backend_errors > 0)) return;
    const dot = s('circle', { cx: xy(i, 0)[0], cy: plot.y + 4, r: 3.5, class: 'dot-errors' });
    dot.append(s('title', null, `${clock(slot.t)}: ${num(slot.backend_errors)} backend error(s)`));
    svg.append(dot);
  });
  if (max === 0) empty(svg, plot, 'no backend samples in the last 15 minutes');
  container.replaceChildren(svg);
  legend(legendEl, [['line-p50', 'p50'], ['line-p99', 'p99'], ['dot-errors', 'backend errors in the slot']]);
}
