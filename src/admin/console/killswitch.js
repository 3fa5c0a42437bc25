// The kill-switch panel: entries with a live expiry countdown, an add form that always runs a
// dry run first and shows its impact before the confirm button can send the real add, and a
// two-step lift per entry. Actions use the token typed at the top of the page.

import { h, byId, fill, setText, num, duration, message, facts, selectingIn } from './dom.js';
import { act, ActionError } from './api.js';

export class KillSwitchPanel {
  /** `token()` reads the typed token; `changed()` asks for a refresh after an action. */
  constructor(token, changed) {
    this.token = token;
    this.changed = changed;
    this.entries = [];
    this.fetchedAt = 0;
    this.pendingLift = null;
    this.previewed = null; // the exact body the dry run was run with
    this.busy = false;
    this.form = byId('kill-form');
    this.msg = byId('kill-message');
    this.form.addEventListener('submit', (e) => {
      e.preventDefault();
      this.dryRun();
    });
    // Any edit invalidates the preview: what is confirmed is always what was previewed.
    this.form.addEventListener('input', () => this.clearPreview());
    byId('kill-confirm').addEventListener('click', () => this.confirm());
    byId('kill-cancel').addEventListener('click', () => this.clearPreview());
    setInterval(() => this.tick(), 1000);
  }

  /** Puts a version and a reason in the form (from a suspect row); nothing is sent. */
  prefill(version, reason) {
    byId('kill-versions').value = version;
    const r = byId('kill-reason');
    if (!r.value) r.value = `suspect cohort: ${reason}`;
    this.clearPreview();
    message(this.msg, `Form filled with ${version}: check the reason and TTL, then run the dry run.`, '');
    byId('kill-panel').scrollIntoView({ behavior: 'smooth', block: 'start' });
  }

  body() {
    const versions = byId('kill-versions').value.trim();
    const reason = byId('kill-reason').value.trim();
    const ttl = byId('kill-ttl').value.trim();
    const body = { versions, reason };
    if (ttl) body.ttl = ttl;
    return body;
  }

  clearPreview() {
    this.previewed = null;
    byId('kill-preview').hidden = true;
  }

  async dryRun() {
    if (this.busy) return;
    const body = this.body();
    this.clearPreview();
    if (!body.versions) return message(this.msg, 'Type a version range first, for example >=3.8.0-b3 or =3.8.0-b3.', 'error');
    if (!body.reason) return message(this.msg, 'A reason is required: it is shown in listings, refusals and the audit trail.', 'error');
    await this.run(async () => {
      const answer = await act('POST', '/v1/killswitch?dry_run=true', this.token(), body);
      this.previewed = body;
      this.showPreview(answer || {});
      message(this.msg, 'Dry run only: nothing is refused yet. Check the impact, then confirm.', '');
    });
  }

  showPreview(answer) {
    const entry = answer.entry || {};
    const impact = answer.impact || {};
    const census = answer.census || impact.census || null;
    const parts = [
      h('p', null, 'Would refuse ', h('code', null, entry.versions || this.previewed.versions),
        ` with status ${entry.status || 503}`,
        entry.expires_at ? `, for ${duration(entry.expires_at - entry.created_at)}` : ', until lifted',
        '.'),
    ];
    const rows = [
      ['Open connections it matches', h('span', { class: 'figure', id: 'kill-impact-connections' }, num(impact.matching_connections))],
      answer.scope ? ['Applies to', answer.scope === 'fleet' ? 'every instance of the fleet' : 'this instance'] : null,
      ['Of those, closed', `${num(impact.closing)}${entry.close_existing === false ? ' (close_existing = false)' : entry.drain ? ` over ${entry.drain}` : ''}`],
    ];
    if (census) rows.push(['Handshakes in the last minute it would have refused', h('span', { class: 'figure' }, num(census.handshakes_last_minute))]);
    const dl = h('dl', { class: 'facts' });
    facts(dl, rows);
    parts.push(dl);
    if (census && (census.versions || []).length) {
      parts.push(h('table', { class: 'data' },
        h('thead', null, h('tr', null, h('th', null, 'Version'), h('th', { class: 'num' }, 'Open conns'), h('th', { class: 'num' }, 'Handshakes /min'))),
        h('tbody', null, census.versions.map((v) => h('tr', null,
          h('td', null, v.version), h('td', { class: 'num' }, num(v.active_connections)), h('td', { class: 'num' }, num(v.handshakes_last_minute)))))));
    } else if (census) {
      parts.push(h('p', { class: 'muted' }, 'No version seen in the census falls in this range.'));
    }
    fill(byId('kill-preview-body'), parts);
    setText(byId('kill-confirm'), `Confirm: refuse ${entry.versions || this.previewed.versions} now`);
    byId('kill-preview').hidden = false;
  }

  async confirm() {
    if (this.busy || !this.previewed) return;
    const body = this.previewed;
    await this.run(async () => {
      const answer = (await act('POST', '/v1/killswitch', this.token(), body)) || {};
      const entry = answer.entry || {};
      this.clearPreview();
      this.form.reset();
      byId('kill-ttl').value = '2h';
      message(this.msg, `Refusing ${entry.versions} as ${entry.id}. Undo: ${answer.undo || 'lift it below'}.`, 'ok');
      this.changed();
    });
  }

  async lift(e) {
    if (this.busy) return;
    const id = e.id;
    // In fleet mode an entry of this instance only is lifted with ?scope=local (as --local).
    const local = this.fleetStore && e.scope === 'local' ? '?scope=local' : '';
    await this.run(async () => {
      const answer = (await act('DELETE', `/v1/killswitch/${encodeURIComponent(id)}${local}`, this.token())) || {};
      this.pendingLift = null;
      const spec = answer.removed || {};
      message(this.msg, `Lifted ${spec.versions || id} (${id}): those versions are decided by the rules again.`, 'ok');
      this.changed();
    });
  }

  /** Runs one action, turning its failure into the panel's message. */
  async run(action) {
    this.busy = true;
    for (const b of this.form.querySelectorAll('button')) b.disabled = true;
    try {
      await action();
    } catch (e) {
      message(this.msg, e instanceof ActionError ? e.message : `Unexpected error: ${e.message}`, 'error');
    } finally {
      this.busy = false;
      for (const b of this.form.querySelectorAll('button')) b.disabled = false;
      this.render();
    }
  }

  /** Renders a /v1/killswitch answer. */
  update(data) {
    this.entries = data.entries || [];
    this.fleetStore = data.fleet_store || null;
    this.fetchedAt = performance.now();
    setText(byId('kill-persisted'), [
      data.fleet_store ? `fleet entries in ${data.fleet_store}${data.synced === false ? ' (NOT synced: showing the last-known-good copy)' : ''}` : '',
      data.persisted_in ? `local entries persisted in ${data.persisted_in}` : (data.fleet_store ? '' : 'no state_dir: entries cannot be created on this instance'),
    ].filter(Boolean).join(' · '));
    this.render();
  }

  render() {
    if (!this.busy && this.pendingLift === null && selectingIn(byId('kill-table'))) return;
    const rows = this.entries.map((e) => {
      const confirming = this.pendingLift === e.id;
      const actions = confirming
        ? [h('button', { type: 'button', class: 'danger lift-confirm', disabled: this.busy, onclick: () => this.lift(e) }, 'Confirm lift'),
          ' ', h('button', { type: 'button', class: 'small', onclick: () => { this.pendingLift = null; this.render(); } }, 'Cancel')]
        : h('button', { type: 'button', class: 'small lift', disabled: this.busy, onclick: () => { this.pendingLift = e.id; this.render(); } }, 'Lift');
      return h('tr', { dataset: { id: e.id } },
        h('td', { class: 'mono' }, e.versions, e.active === false ? h('div', { class: 'muted' }, '(not in force)') : null),
        h('td', null, e.reason),
        h('td', { class: 'num expires', dataset: { expiresIn: e.expires_in_s === null || e.expires_in_s === undefined ? '' : e.expires_in_s } },
          this.remaining(e)),
        h('td', { class: 'num' }, num(e.matching_connections)),
        h('td', { class: 'muted' }, e.id, e.created_by ? ` · ${e.created_by}` : '', this.fleetStore ? ` · ${e.scope}` : ''),
        h('td', null, actions));
    });
    if (rows.length === 0) rows.push(h('tr', null, h('td', { colSpan: 6, class: 'muted' }, 'No entries: nothing is refused by the kill switch.')));
    fill(byId('kill-rows'), rows);
  }

  remaining(e) {
    if (e.expires_in_s === null || e.expires_in_s === undefined) return 'never';
    const left = e.expires_in_s - (performance.now() - this.fetchedAt) / 1000;
    return left <= 0 ? 'expired' : duration(left);
  }

  /** Counts expiries down between refreshes. */
  tick() {
    const cells = byId('kill-rows').querySelectorAll('td.expires');
    cells.forEach((td, i) => {
      const e = this.entries[i];
      if (e) setText(td, this.remaining(e));
    });
  }
}
