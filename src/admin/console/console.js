// fwgate incident console: reads the admin API's JSON every few seconds and renders it. It
// never computes a figure the API does not give, so the page and `curl` always agree.
// Panels whose endpoint this instance does not have say so instead of breaking.

import { byId, setText, num } from './console/dom.js';
import { read } from './console/api.js';
import { drawDecisions, drawBackend } from './console/chart.js';
import { CohortTable } from './console/cohorts.js';
import { KillSwitchPanel } from './console/killswitch.js';
import { renderRules, renderAudit, renderUpstream, renderFleet, wireRulesPreview, wireExplain } from './console/panels.js';

/** How often the page reads the API. */
const REFRESH_MS = 3000;

// The admin token is only ever in this closure (read from the password field when an action
// is sent): never in storage, cookies or URLs.
const tokenInput = byId('token');
const token = () => tokenInput.value.trim();
byId('token-forget').addEventListener('click', () => { tokenInput.value = ''; });

const killPanel = new KillSwitchPanel(token, () => refresh());
const cohorts = new CohortTable((version, reason) => killPanel.prefill(version, reason));
wireRulesPreview();
wireExplain();

let lastTimeline = null;
function drawCharts() {
  if (!lastTimeline) return;
  drawDecisions(byId('decisions-chart'), byId('decisions-legend'), lastTimeline);
  drawBackend(byId('backend-chart'), byId('backend-legend'), lastTimeline);
}
let resizeTimer = null;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(drawCharts, 150);
});

function renderVersions(v) {
  cohorts.render(v);
  const suspects = (v.versions || []).filter((r) => r.suspect);
  const count = v.suspects ?? suspects.length;
  setText(byId('suspect-count'), num(count));
  setText(byId('suspect-names'), suspects.length ? suspects.map((r) => r.version).join(', ') : 'none flagged');
  byId('tile-suspects').className = `tile ${count > 0 ? 'bad' : 'ok'}`;
}

function renderKill(k) {
  killPanel.update(k);
  const n = (k.entries || []).length;
  setText(byId('kill-count'), num(n));
  setText(byId('kill-sub'), n ? (k.entries || []).map((e) => e.versions).join(', ') : 'nothing refused by the kill switch');
  byId('tile-kill').className = `tile ${n > 0 ? 'warn' : ''}`;
}

function renderRulesAndTile(r) {
  renderRules(r);
  setText(byId('rules-generation'), num(r.generation));
  const warnings = (r.warnings || []).length;
  setText(byId('rules-sub'), r.last_error ? 'last reload FAILED: previous rules in force'
    : `${(r.rules || []).length} rules · ${warnings} warning${warnings === 1 ? '' : 's'}`);
  byId('tile-rules').className = `tile ${r.last_error ? 'bad' : warnings ? 'warn' : ''}`;
}

/** Every endpoint the page reads, with its renderer and where to say it is unavailable. */
const PANELS = [
  { path: '/v1/versions', render: renderVersions, unavailable: 'cohorts-unavailable' },
  { path: '/v1/timeline', render: (t) => { lastTimeline = t; drawCharts(); }, unavailable: ['timeline-unavailable', 'backend-unavailable'] },
  { path: '/v1/killswitch', render: renderKill, unavailable: 'kill-unavailable' },
  { path: '/v1/rules', render: renderRulesAndTile, unavailable: 'rules-unavailable' },
  { path: '/v1/audit', render: renderAudit, unavailable: 'audit-unavailable' },
  {
    path: '/v1/upstream',
    render: renderUpstream,
    unavailable: 'upstream-unavailable',
    gone: () => setText(byId('upstream-sub'), 'not available on this instance'),
  },
  // Fleet mode is fixed for the life of the process: 404 (or {"fleet": false}) at load hides
  // the fleet box for good, so the page does not ask again every few seconds.
  {
    path: '/v1/fleet',
    render: (f) => {
      if (f && f.fleet === false) return false;
      renderFleet(f);
      return true;
    },
    gone: () => { byId('fleet-box').hidden = true; },
  },
];

let refreshes = 0;
let lastOk = 0;
let lastError = '';
let inFlight = false;
let again = false;

/** Reads every endpoint once and renders what came back (once more at the end when asked
 * during a read, so an action's effect shows at once). */
async function refresh() {
  if (inFlight) {
    again = true;
    return;
  }
  inFlight = true;
  const active = PANELS.filter((p) => !p.skip);
  const results = await Promise.all(active.map((p) => read(p.path)));
  const errors = [];
  active.forEach((p, i) => {
    const r = results[i];
    if (r.unavailable !== undefined) {
      // The endpoint does not exist here (an older fwgate, or fleet mode off): say so once.
      p.skip = true;
      for (const id of [p.unavailable || []].flat()) {
        const el = byId(id);
        el.hidden = false;
        setText(el, `Not available on this instance: GET ${p.path} answered 404 (${r.unavailable}).`);
      }
      if (p.gone) p.gone();
      return;
    }
    if (r.error) { errors.push(r.error); return; }
    try {
      // A renderer answering false means "off on this instance": stop asking.
      if (p.render(r.data) === false) {
        p.skip = true;
        if (p.gone) p.gone();
      }
    } catch (e) {
      errors.push(`${p.path}: cannot show this answer (${e.message})`);
      console.error(e);
    }
  });
  refreshes += 1;
  if (errors.length === 0) {
    lastOk = Date.now();
    lastError = '';
  } else {
    lastError = errors.join('; ');
  }
  document.documentElement.dataset.refreshes = String(refreshes);
  showLive();
  inFlight = false;
  if (again) {
    again = false;
    refresh();
  }
}

function showLive() {
  const live = byId('live');
  if (!lastError) {
    live.classList.remove('stale');
    setText(live, `live · updated ${new Date(lastOk).toLocaleTimeString('en-GB', { hour12: false })} · ${location.host}`);
    return;
  }
  live.classList.add('stale');
  const age = lastOk ? `${Math.round((Date.now() - lastOk) / 1000)} s ago` : 'never';
  setText(live, `STALE: last good update ${age}. ${lastError}`);
}

refresh();
setInterval(refresh, REFRESH_MS);
setInterval(showLive, 1000);
