// The cohort table: one row per version from /v1/versions, in the API's order (suspects
// first) until the operator clicks a header. A suspect row is red AND says "SUSPECT" with its
// reasons and the exact command the API suggests.

import { h, byId, fill, setText, num, ms, selectingIn, copyButton } from './dom.js';

const minute = (row, field) => (row[field] || {});

/** Sort keys by column; null/undefined sort last whatever the direction. */
const KEYS = {
  version: (r) => r.version,
  decision: (r) => `${r.decision} ${r.rule}`,
  active: (r) => r.active_connections,
  handshakes: (r) => r.handshakes_last_minute,
  p50: (r) => minute(r, 'backend_last_minute').p50_ms,
  p99: (r) => minute(r, 'backend_last_minute').p99_ms,
  errors: (r) => minute(r, 'backend_last_minute').errors,
  churn: (r) => minute(r, 'tunnels_last_minute').short,
  held: (r) => r.held_back_last_minute,
  suspect: (r) => (r.suspect ? 0 : 1),
};

const REFUSAL_KINDS = ['deny', 'limited', 'killswitch'];

/** The table, its sort state, and what to do when "use in kill form" is clicked. */
export class CohortTable {
  constructor(onUseVersion) {
    this.onUseVersion = onUseVersion;
    this.sort = null; // { key, dir: 1 | -1 } or null for the API's order
    this.last = null;
    this.drawn = null; // what the table shows now: [report JSON, sort] as text
    this.openRules = new Set(); // versions whose suggested rule is unfolded
    this.table = byId('cohorts');
    for (const th of this.table.querySelectorAll('th.sortable')) {
      th.addEventListener('click', () => this.sortBy(th.dataset.key));
    }
    byId('cohort-default-order').addEventListener('click', () => {
      this.sort = null;
      this.redraw();
    });
  }

  sortBy(key) {
    if (this.sort && this.sort.key === key) this.sort = { key, dir: -this.sort.dir };
    else this.sort = { key, dir: key === 'version' || key === 'decision' || key === 'suspect' ? 1 : -1 };
    this.redraw();
  }

  redraw() {
    if (this.last) this.render(this.last, true);
  }

  /** Renders a /v1/versions answer. An unchanged answer is not redrawn, and neither is the
   * table while the operator selects text in it (the next refresh catches up). */
  render(report, force) {
    this.last = report;
    const drawn = JSON.stringify([report, this.sort]);
    if (!force && (drawn === this.drawn || selectingIn(this.table))) return;
    this.drawn = drawn;
    for (const th of this.table.querySelectorAll('th.sortable')) {
      const on = this.sort && this.sort.key === th.dataset.key;
      th.classList.toggle('sorted-asc', Boolean(on && this.sort.dir === 1));
      th.classList.toggle('sorted-desc', Boolean(on && this.sort.dir === -1));
    }
    const rows = (report.versions || []).map((row, i) => ({ row, i }));
    if (this.sort) {
      const key = KEYS[this.sort.key];
      const dir = this.sort.dir;
      rows.sort((a, b) => {
        const x = key(a.row);
        const y = key(b.row);
        const xn = x === null || x === undefined;
        const yn = y === null || y === undefined;
        if (xn || yn) return xn === yn ? a.i - b.i : xn ? 1 : -1;
        if (x < y) return -dir;
        if (x > y) return dir;
        return a.i - b.i;
      });
    }
    const body = byId('cohort-rows');
    if (rows.length === 0) {
      fill(body, h('tr', null, h('td', { colSpan: 11, class: 'muted' }, 'No handshakes seen yet: the census lists a version once a device with it connects.')));
    } else {
      fill(body, rows.map(({ row }) => this.rowElements(row)));
    }
    const other = report.other;
    const tfoot = byId('cohort-other');
    if (other && (other.handshakes_last_minute > 0 || other.active_connections > 0)) {
      fill(tfoot, h('tr', null, figures({ ...other, version: '(other versions)', decision: '', rule: '' }, true)));
    } else {
      fill(tfoot);
    }
    setText(byId('cohorts-note'), report.note || '');
  }

  rowElements(row) {
    const suspect = row.suspect;
    const tr = h('tr', { class: suspect ? 'suspect' : '', dataset: { version: row.version } }, figures(row, false));
    if (!suspect) return [tr];
    const reasons = suspect.reasons || [];
    const commands = [];
    if (suspect.kill_command) {
      const code = h('code', { class: 'kill-command' }, suspect.kill_command);
      commands.push(h('div', null, 'Refuse it now: ', code, ' ', copyButton(suspect.kill_command, code)));
    }
    if (suspect.limit_rule) {
      const pre = h('pre', { class: 'limit-rule' }, suspect.limit_rule);
      const details = h('details', { open: this.openRules.has(row.version) },
        h('summary', null, 'Or throttle it with a rule in rules.toml'), pre, copyButton(suspect.limit_rule, pre));
      details.addEventListener('toggle', () => {
        if (details.open) this.openRules.add(row.version);
        else this.openRules.delete(row.version);
      });
      commands.push(details);
    }
    const parsed = !row.version.startsWith('(');
    const detail = h('tr', { class: 'suspect-detail', dataset: { version: row.version } },
      h('td', { colSpan: 11 },
        h('ul', { class: 'reasons' }, reasons.map((r) => h('li', null, r))),
        h('div', { class: 'commands' }, commands,
          parsed && h('div', null, h('button', {
            type: 'button',
            class: 'small use-version',
            onclick: () => this.onUseVersion(`=${row.version}`, reasons[0] || 'suspect cohort'),
          }, `Fill the kill-switch form with ${row.version}`)),
          h('div', { class: 'muted' }, 'fwgate only suggests: nothing is refused until you act.'))));
    return [tr, detail];
  }
}

/** The cells of one row (a version's figures, or `other`'s). */
function figures(row, isOther) {
  const backend = minute(row, 'backend_last_minute');
  const tunnels = minute(row, 'tunnels_last_minute');
  const refused = row.refused_last_minute || {};
  const refusedText = REFUSAL_KINDS.filter((k) => refused[k] > 0).map((k) => `${k} ${num(refused[k])}`).join(' · ');
  const errors = backend.errors === undefined ? '–'
    : `${num(backend.errors)}${backend.timeouts > 0 ? ` + ${num(backend.timeouts)} timeouts` : ''}`;
  const decision = isOther ? '' : [
    h('span', { class: `badge ${row.decision}` }, row.decision),
    ' ',
    h('span', { class: 'rule-name' }, row.rule),
  ];
  const suspect = row.suspect;
  return [
    h('td', { class: 'version' }, row.version),
    h('td', { class: 'decision' }, decision),
    h('td', { class: 'num active' }, num(row.active_connections)),
    h('td', { class: 'num handshakes' }, num(row.handshakes_last_minute)),
    h('td', { class: 'num p50' }, ms(backend.p50_ms)),
    h('td', { class: 'num p99' }, ms(backend.p99_ms)),
    h('td', { class: 'num errors' }, errors),
    h('td', { class: 'num churn' }, num(tunnels.short)),
    h('td', { class: 'num held' }, num(row.held_back_last_minute)),
    h('td', { class: 'refused' }, refusedText || (isOther ? '' : '–')),
    h('td', { class: 'suspect-flag' }, suspect
      ? [h('span', { class: 'badge suspect' }, 'SUSPECT'), h('div', { class: 'small-text' }, 'reasons below')]
      : (isOther ? '' : 'no')),
  ];
}
