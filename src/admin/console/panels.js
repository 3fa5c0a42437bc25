// The read-mostly panels: rules in force (with the diff and a rules-file impact preview), the
// explain box, the audit trail, upstream health and fleet state. Each renders one endpoint's
// JSON as it is.

import { h, byId, fill, setText, num, ms, clock, duration, facts, message, selectingIn } from './dom.js';

function actionText(a) {
  if (!a) return '–';
  if (a.action === 'deny') return `deny ${a.status}${a.retry_after ? `, retry after ${a.retry_after}` : ''}`;
  if (a.action === 'limit') {
    const parts = [];
    if (a.rate) parts.push(`${a.rate} burst ${a.burst} per ${a.key}`);
    if (a.max_connections) parts.push(`≤ ${a.max_connections} conns`);
    return `limit ${parts.join(', ')}`;
  }
  return a.action;
}

/** Renders /v1/rules. */
export function renderRules(r) {
  const hash = String(r.content_hash || '');
  facts(byId('rules-facts'), [
    ['Generation', h('strong', null, num(r.generation))],
    ['Source', r.source],
    ['Content hash', h('code', { title: hash }, hash.length > 16 ? `${hash.slice(0, 16)}…` : hash)],
    ['Loaded', clock(r.loaded_at_unix)],
    ['Ordering', r.ordering],
    ['Defaults', `${actionText((r.defaults || {}).action)} · missing: ${actionText((r.defaults || {}).missing)} · unparseable: ${actionText((r.defaults || {}).unparseable)}`],
  ]);
  message(byId('rules-error'), r.last_error
    ? `The last reload failed; the rules below stay in force. ${r.last_error}` : '', 'error');
  fill(byId('rules-warnings'), (r.warnings || []).map((w) => h('li', null, `warning: ${w}`)));
  const rules = r.rules || [];
  fill(byId('rules-rows'), rules.length ? rules.map((x) => h('tr', null,
    h('td', { class: 'num' }, x.line ?? ''),
    h('td', null, x.name),
    h('td', { class: 'mono' }, x.versions, x.path_prefix ? ` (path ${x.path_prefix})` : ''),
    h('td', null, actionText(x)),
    h('td', null, x.mode))) : h('tr', null, h('td', { colSpan: 5, class: 'muted' }, 'No [[rule]]: the defaults decide.')));
  const box = byId('rules-diff-box');
  const pre = byId('rules-diff');
  if (!('diff_from_previous' in r)) {
    setText(pre, 'not available on this instance');
  } else if (r.diff_from_previous === null) {
    setText(pre, 'no previous generation since this process started');
  } else {
    const d = r.diff_from_previous;
    fill(pre, h('div', { class: 'muted' }, `from generation ${d.from_generation} to ${r.generation}`),
      (d.lines || []).map((l) => h('div', { class: l.op === '+' ? 'add' : l.op === '-' ? 'del' : '' }, `${l.op} ${l.text}`)));
  }
  box.dataset.generation = r.generation;
}

/** Wires the rules-file preview form (POST /v1/rules/preview; nothing is applied). */
export function wireRulesPreview() {
  const out = byId('preview-result');
  byId('preview-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const text = byId('preview-text').value;
    out.hidden = false;
    if (!text.trim()) return fill(out, h('p', { class: 'message error' }, 'Paste a rules file first.'));
    let resp;
    let data = null;
    try {
      resp = await fetch('/v1/rules/preview', { method: 'POST', body: text, headers: { 'Content-Type': 'text/plain' }, cache: 'no-store' });
      data = await resp.json().catch(() => null);
    } catch (err) {
      return fill(out, h('p', { class: 'message error' }, `Could not reach fwgate: ${err.message}`));
    }
    if (resp.status === 404) return fill(out, h('p', { class: 'muted' }, 'Rules preview is not available on this instance.'));
    if (!data || data.valid === false || !resp.ok) {
      return fill(out, h('p', { class: 'message error' }, `Invalid rules file, nothing would change: ${(data && data.error) || resp.status}`));
    }
    const totals = data.totals || {};
    const line = (key, label) => {
      const t = totals[key] || {};
      return [label, h('span', { class: `total-${key}` }, h('span', { class: 'figure' }, num(t.versions)), ` versions · ${num(t.active_connections)} open connections · ${num(t.handshakes_last_minute)} handshakes /min`)];
    };
    const dl = h('dl', { class: 'facts' });
    facts(dl, [line('newly_refused', 'Newly refused'), line('newly_limited', 'Newly limited'), line('newly_admitted', 'Newly admitted'),
      totals.no_longer_limited ? line('no_longer_limited', 'No longer limited') : null,
      ['Rules', num(data.rules)]]);
    const changes = data.changes || [];
    fill(out,
      h('p', { class: 'message ok' }, 'Valid. Nothing was applied: this is what the census says the file would change.'),
      dl,
      data.note ? h('p', { class: 'muted' }, data.note) : null,
      (data.warnings || []).map((w) => h('p', { class: 'warnings' }, `warning: ${w}`)),
      changes.length ? h('table', { class: 'data' },
        h('thead', null, h('tr', null, ['Version', 'Change', 'From', 'To', 'Open conns', 'Handshakes /min'].map((t) => h('th', null, t)))),
        h('tbody', null, changes.map((c) => h('tr', null,
          h('td', { class: 'mono' }, c.version),
          h('td', null, String(c.change).replaceAll('_', ' ')),
          h('td', null, `${(c.from || {}).decision} (${(c.from || {}).rule})`),
          h('td', null, `${(c.to || {}).decision} (${(c.to || {}).rule})`),
          h('td', { class: 'num' }, num(c.active_connections)),
          h('td', { class: 'num' }, num(c.handshakes_last_minute))))))
        : h('p', { class: 'muted' }, 'No version in the census would be decided differently.'));
  });
}

/** Wires the explain box (GET /v1/explain). */
export function wireExplain() {
  const out = byId('explain-result');
  byId('explain-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const version = byId('explain-version').value.trim();
    const path = byId('explain-path').value.trim();
    out.hidden = false;
    const q = new URLSearchParams({ version });
    if (path) q.set('path', path);
    let resp;
    let data = null;
    try {
      resp = await fetch(`/v1/explain?${q}`, { cache: 'no-store' });
      data = await resp.json().catch(() => null);
    } catch (err) {
      return fill(out, h('p', { class: 'message error' }, `Could not reach fwgate: ${err.message}`));
    }
    if (resp.status === 404) return fill(out, h('p', { class: 'muted' }, 'Explain is not available on this instance.'));
    if (!resp.ok || !data) return fill(out, h('p', { class: 'message error' }, `fwgate answered ${resp.status}: ${(data && data.error) || ''}`));
    const dl = h('dl', { class: 'facts' });
    facts(dl, [
      ['Version', data.version === null ? `${data.input} (not a version)` : data.version],
      ['Decision', h('span', null, h('span', { class: `badge ${data.decision} explain-decision` }, data.decision), data.status ? ` status ${data.status}` : '')],
      ['Rule', data.rule],
      data.by ? ['By', data.by] : null,
      data.shadow ? ['Shadow', `rule ${data.shadow} matched in shadow mode (counted, not enforced)`] : null,
    ]);
    fill(out, dl, h('pre', { class: 'explain-text' }, data.text || ''));
  });
}

/** Renders /v1/audit. */
let auditDrawn = null;
export function renderAudit(a) {
  const drawn = JSON.stringify(a);
  if (drawn === auditDrawn || selectingIn(byId('audit-table'))) return;
  auditDrawn = drawn;
  const events = a.events || [];
  fill(byId('audit-rows'), events.length ? events.map((e) => h('tr', { class: `audit-${e.action}` },
    h('td', { class: 'mono' }, clock(e.time)),
    h('td', null, String(e.action || '').replaceAll('_', ' ')),
    h('td', { class: 'mono' }, e.versions ?? ''),
    h('td', null, [e.reason, e.detail].filter(Boolean).join(' · ')),
    h('td', { class: 'muted' }, e.id ?? ''),
    h('td', { class: 'muted' }, e.by ?? ''))) : h('tr', null, h('td', { colSpan: 6, class: 'muted' }, 'Nothing changed since this process started.')));
}

const STATE_CLASS = { idle: '', ok: 'ok', degraded: 'warn', failing: 'bad' };

/** Renders /v1/upstream, in its panel and its tile. */
export function renderUpstream(u) {
  const m = u.last_minute || {};
  facts(byId('upstream-facts'), [
    ['Backend', h('code', null, u.addr)],
    ['State', h('span', { class: `badge ${u.state}` }, u.state)],
    ['Exchanges in progress', num(u.active)],
    ['Connects in progress', num(u.pending_connects)],
    ['Last minute', `${num(m.samples)} samples · p50 ${ms(m.p50_ms)} · p99 ${ms(m.p99_ms)} · ${num(m.errors)} errors · ${num(m.timeouts)} timeouts`],
  ]);
  setText(byId('upstream-state'), u.state);
  setText(byId('upstream-sub'), `p99 ${ms(m.p99_ms)} · ${num(m.errors)} errors /min`);
  byId('tile-upstream').className = `tile ${STATE_CLASS[u.state] || ''}`;
}

/** Renders /v1/fleet (only called when fleet mode is on). */
export function renderFleet(f) {
  const store = f.store || {};
  byId('fleet-box').hidden = false;
  facts(byId('fleet-facts'), [
    ['This instance', f.instance],
    ['Store', `${store.kind || ''} ${(store.endpoints || []).join(', ')} ${store.prefix || ''}`],
    ['Connected', h('span', { class: store.connected ? 'state-ok' : 'state-bad' }, store.connected ? 'yes' : `no (serving ${store.source || 'the last-known-good copy'})`)],
    ['Applied revision', `${num(f.applied_revision)} (store at ${num(store.revision)})`],
    ['Converged', h('span', { class: f.converged ? 'state-ok' : 'state-warn' }, f.converged ? 'yes: every live instance has the same revision' : 'no')],
    store.last_error ? ['Last store error', h('span', { class: 'state-bad' }, store.last_error)] : null,
    f.instances_error ? ['Instance list', h('span', { class: 'state-bad' }, f.instances_error)] : null,
  ]);
  fill(byId('fleet-rows'), (f.instances || []).map((i) => h('tr', null,
    h('td', null, i.id, i.live === false ? ' (silent)' : ''),
    h('td', { class: 'num' }, num(i.applied_revision)),
    h('td', { class: 'num' }, `${duration(i.age_s)} ago`),
    h('td', { class: 'mono' }, i.admin),
    h('td', null, i.source))));
}
