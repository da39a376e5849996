// tandem's dashboard: one page, hash routes (#/overview, #/groups,
// #/volumes, #/events, #/audit), everything read from the REST API with the
// token the user pasted. The token lives in sessionStorage only (gone when
// the tab closes) and is sent as `Authorization: Bearer`; there are no
// cookies, so another site cannot make the browser act for the user.
//
// Text reaches the page only through textContent (never innerHTML): a name
// or message from the cluster is shown, never run. Every visible word comes
// from the translation table in i18n.js; what the cluster wrote itself (a
// placement reason, an error) is marked `data-raw`.
'use strict';

const S = {
  token: sessionStorage.getItem('tandem.token') || '',
  who: '',
  role: '',
  lang: 'en',
  view: 'overview',
  cluster: null,
  clusterError: null,
  groups: [],
  details: {},
  volumes: [],
  verify: {},
  events: [],
  eventIds: new Set(),
  lastEventId: 0,
  streamState: 'idle',
  reconnects: 0,
  resets: 0,
  audit: [],
  poller: null,
  stream: null,
};

// ---- helpers ----

function t(key, vars) {
  const table = window.TANDEM_I18N[S.lang] || {};
  let s = table[key];
  if (s === undefined) s = (window.TANDEM_I18N.en || {})[key];
  if (s === undefined) return key;
  for (const [k, v] of Object.entries(vars || {})) s = s.split('{' + k + '}').join(String(v));
  return s;
}

function has(key) {
  return Object.prototype.hasOwnProperty.call(window.TANDEM_I18N[S.lang] || {}, key);
}

// An element: attributes (`text` sets textContent, `on*` handlers) and children.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// Text the cluster wrote (names excepted): shown as is.
function raw(text) {
  return el('span', { 'data-raw': true, lang: 'en', text: text });
}

// A translated value (`state.running`), or the value itself when unknown.
function tv(prefix, value) {
  if (value === null || value === undefined || value === '') return el('span', { text: '—' });
  const key = prefix + '.' + value;
  return has(key) ? el('span', { text: t(key) }) : raw(String(value));
}

// Colour AND text: a status readable from across the room.
function badge(cls, prefix, value) {
  const b = el('span', { class: 'badge ' + cls });
  b.append(tv(prefix, value));
  return b;
}

function tone(value) {
  switch (value) {
    case 'online': case 'running': case 'up': case 'connected': case 'Connected': case 'UpToDate':
    case 'info': case 'done': case 'ok':
      return 'ok';
    case 'offline': case 'failed': case 'down': case 'critical': case 'SplitBrain': case 'Disconnected':
    case 'Inconsistent': case 'lost':
      return 'bad';
    default:
      return 'warn';
  }
}

function fmtTime(ms) {
  if (!ms) return '—';
  // The browser's own time zone.
  return new Date(ms).toLocaleString(S.lang === 'zh' ? 'zh-CN' : 'en-GB', { hour12: false });
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return (i === 0 ? String(v) : v.toFixed(1)) + ' ' + units[i];
}

// A node's lease as the answering node sees it: time left, or lapsed.
function leaseText(ms) {
  if (ms === null || ms === undefined) return '—';
  return ms > 0 ? t('lease.left', { t: fmtMs(ms) }) : t('lease.lapsed');
}

function fmtMs(ms) {
  return ms >= 10000 ? t('unit.s', { n: (ms / 1000).toFixed(1) }) : t('unit.ms', { n: ms });
}

function setStatus(text, kind, rawText) {
  const s = document.getElementById('status');
  s.replaceChildren();
  s.className = 'status ' + (text ? kind || '' : '');
  if (!text) return;
  s.append(el('span', { text: text }));
  if (rawText) s.append(' ', raw(rawText));
}

// Replaces a container's children only when they changed: a poll every
// second must not take the focus or a half-made choice from the user.
function swap(container, children) {
  const next = el('div', {}, children);
  if (container.innerHTML === next.innerHTML) return;
  const focused = document.activeElement && document.activeElement.id;
  const chosen = {};
  for (const s of container.querySelectorAll('select[id]')) chosen[s.id] = s.value;
  container.replaceChildren(...next.childNodes);
  for (const [id, v] of Object.entries(chosen)) {
    const s = document.getElementById(id);
    if (s && [...s.options].some((o) => o.value === v)) s.value = v;
  }
  if (focused) {
    const f = document.getElementById(focused);
    if (f) f.focus();
  }
}

function canOperate() {
  return ['operator', 'admin', 'node', 'local'].includes(S.role);
}

function isAdmin() {
  return ['admin', 'node', 'local'].includes(S.role);
}

async function api(method, path, body) {
  const headers = { Authorization: 'Bearer ' + S.token };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (e) {
    return { status: 0, body: { message: String(e) } };
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401 && S.token) {
    signOut(t('signin.expired'));
  }
  return { status: resp.status, body: data };
}

// ---- sign-in ----

async function signIn(token) {
  S.token = token.trim();
  const r = await api('GET', '/v1/session');
  if (r.status !== 200 || !r.body) {
    S.token = '';
    document.getElementById('signin-error').textContent =
      r.status === 401 ? t('signin.refused') : t('signin.failed', { status: r.status });
    return false;
  }
  sessionStorage.setItem('tandem.token', S.token);
  S.who = r.body.who;
  S.role = r.body.role;
  started();
  return true;
}

function signOut(why) {
  S.token = '';
  S.who = '';
  S.role = '';
  sessionStorage.removeItem('tandem.token');
  if (S.poller) clearInterval(S.poller);
  S.poller = null;
  if (S.stream) S.stream.abort();
  S.stream = null;
  S.events = [];
  S.eventIds = new Set();
  S.lastEventId = 0;
  S.cluster = null;
  S.groups = [];
  S.details = {};
  S.volumes = [];
  S.audit = [];
  for (const id of ['health', 'sites', 'groups', 'volumes', 'timeline', 'failover-chart', 'audit']) {
    document.getElementById(id).replaceChildren();
  }
  document.getElementById('token').value = '';
  document.getElementById('signin-error').textContent = why || '';
  setStatus('');
  route();
}

function started() {
  document.getElementById('token').value = '';
  document.getElementById('signin-error').textContent = '';
  if (S.poller) clearInterval(S.poller);
  S.poller = setInterval(poll, 1000);
  startStream();
  route();
  poll();
}

// ---- routing ----

const VIEWS = ['overview', 'groups', 'volumes', 'events', 'audit'];

function route() {
  const signedIn = !!S.role;
  document.getElementById('signin-view').hidden = signedIn;
  document.getElementById('nav').hidden = !signedIn;
  document.getElementById('signout').hidden = !signedIn;
  document.getElementById('nav-audit').hidden = !isAdmin();
  const who = document.getElementById('whoami');
  who.replaceChildren();
  if (signedIn) who.append(raw(S.who), ' · ', tv('role', S.role));
  let view = (location.hash || '').replace(/^#\//, '') || 'overview';
  if (!VIEWS.includes(view) || (view === 'audit' && !isAdmin())) view = 'overview';
  S.view = view;
  for (const v of VIEWS) document.getElementById('view-' + v).hidden = !signedIn || v !== view;
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.view === view) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!signedIn) {
    document.getElementById('token').focus();
    return;
  }
  render();
  poll();
}

// ---- polling ----

let polling = false;

async function poll() {
  if (!S.role || polling) return;
  polling = true;
  try {
    const [c, g] = await Promise.all([api('GET', '/v1/cluster'), api('GET', '/v1/groups')]);
    if (c.status === 200) { S.cluster = c.body; S.clusterError = null; } else S.clusterError = c;
    if (g.status === 200) S.groups = g.body || [];
    if (S.view === 'groups') {
      const ds = await Promise.all(S.groups.map((x) => api('GET', '/v1/groups/' + encodeURIComponent(x.name))));
      for (const d of ds) if (d.status === 200 && d.body) S.details[d.body.name] = d.body;
    }
    if (S.view === 'volumes') {
      const v = await api('GET', '/v1/volumes');
      if (v.status === 200) S.volumes = v.body || [];
    }
    if (S.view === 'audit' && isAdmin()) {
      const a = await api('GET', '/v1/audit?limit=10000');
      if (a.status === 200) S.audit = a.body || [];
    }
    render();
  } finally {
    polling = false;
  }
}

function render() {
  if (!S.role) return;
  if (S.view === 'overview') renderOverview();
  if (S.view === 'groups') renderGroups();
  if (S.view === 'volumes') renderVolumes();
  if (S.view === 'events') renderEvents();
  if (S.view === 'audit') renderAudit();
}

// ---- actions ----

function confirmDialog(title, text, policy, policyOk) {
  const d = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  const p = document.getElementById('confirm-policy');
  p.textContent = policy || '';
  p.className = policy ? (policyOk ? 'ok-text' : 'bad-text') : '';
  d.returnValue = '';
  return new Promise((resolve) => {
    d.addEventListener('close', () => resolve(d.returnValue === 'ok'), { once: true });
    d.showModal();
  });
}

async function act(method, path, body, what) {
  setStatus(t('action.sending', { what: what }), 'warn');
  const r = await api(method, path, body);
  if (r.status >= 200 && r.status < 300) {
    setStatus(t('action.done', { what: what }), 'ok');
  } else {
    const code = r.body && r.body.code ? r.body.code : String(r.status);
    setStatus(t('action.failed', { what: what, code: code }), 'bad', r.body && r.body.message);
  }
  poll();
  return r;
}

function member(name) {
  return ((S.cluster && S.cluster.members) || []).find((m) => m.name === name);
}

// Whether a move to `to` can succeed, said before it is sent.
function movePolicy(g, to) {
  const m = member(to);
  if (!g.spec.nodes.includes(to)) return [false, t('move.notInList', { node: to })];
  if (!m) return [false, t('move.unknown', { node: to })];
  if (m.role === 'witness') return [false, t('move.witness', { node: to })];
  if (m.state === 'offline') return [false, t('move.offline', { node: to })];
  if (m.admin_state !== 'online') return [false, t('move.admin', { node: to, state: t('admin.' + m.admin_state) })];
  if ((g.failed_on || []).includes(to)) return [false, t('move.failed', { node: to })];
  return [true, t('move.allowed', { node: to, from: g.node || '—' })];
}

async function moveGroup(g) {
  const sel = document.getElementById('move-to-' + g.name);
  const to = sel && sel.value;
  if (!to) return;
  const [ok, why] = movePolicy(g, to);
  const yes = await confirmDialog(t('move.title', { group: g.name }), t('move.text', { group: g.name, node: to }), why, ok);
  if (yes) act('POST', '/v1/groups/' + encodeURIComponent(g.name) + '/move', { to: to }, t('action.move', { group: g.name, node: to }));
}

async function groupAction(g, action) {
  if (action === 'stop') {
    const yes = await confirmDialog(t('stop.title', { group: g.name }), t('stop.text', { group: g.name }));
    if (!yes) return;
  }
  act('POST', '/v1/groups/' + encodeURIComponent(g.name) + '/' + action, undefined, t('action.' + action, { group: g.name }));
}

async function nodeAction(n, action) {
  if (action !== 'online') {
    const yes = await confirmDialog(t('node.' + action + '.title', { node: n.name }), t('node.' + action + '.text', { node: n.name }));
    if (!yes) return;
  }
  act('POST', '/v1/nodes/' + encodeURIComponent(n.name) + '/' + action, undefined, t('action.node.' + action, { node: n.name }));
}

// ---- overview ----

function renderOverview() {
  const c = S.cluster;
  const health = [];
  if (S.clusterError) {
    const e = S.clusterError;
    health.push(el('p', { class: 'badge bad big', role: 'alert' },
      t('health.unavailable', { code: (e.body && e.body.code) || e.status })));
  }
  if (c) {
    const voters = c.members.filter((m) => m.role === 'voter' || m.role === 'witness');
    const heard = voters.filter((m) => m.state !== 'offline').length;
    const quorum = heard * 2 > voters.length;
    health.push(el('dl', { class: 'facts' },
      el('dt', { text: t('health.cluster') }), el('dd', {}, c.cluster_id),
      el('dt', { text: t('health.leader') }), el('dd', { id: 'leader' }, c.leader || '—'),
      el('dt', { text: t('health.term') }), el('dd', {}, String(c.term)),
      el('dt', { text: t('health.quorum') }),
      el('dd', {}, badge(quorum ? 'ok big' : 'bad big', 'quorum', quorum ? 'ok' : 'lost'),
        ' ', t('health.voters', { heard: heard, total: voters.length }))));
  }
  swap(document.getElementById('health'), health);
  if (!c) return;
  const bySite = new Map();
  for (const m of c.members) {
    const site = m.site || '';
    if (!bySite.has(site)) bySite.set(site, []);
    bySite.get(site).push(m);
  }
  const sites = [];
  for (const [site, members] of [...bySite.entries()].sort()) {
    sites.push(el('section', { class: 'site', 'aria-label': site ? t('site.named', { site: site }) : t('site.none') },
      el('h2', {}, site ? t('site.named', { site: site }) : t('site.none')),
      el('div', { class: 'cards' }, members.map(nodeCard))));
  }
  swap(document.getElementById('sites'), sites);
}

function nodeCard(m) {
  const runs = S.groups.filter((g) => g.node === m.name);
  const paths = m.paths.map((p) => el('li', { 'data-path': p.address },
    el('span', { class: 'addr' }, p.address), ' ', badge(tone(p.up ? 'up' : 'down'), 'path', p.up ? 'up' : 'down'),
    p.up || p.last_seen_ms === null ? null : el('span', { class: 'muted' }, ' ', t('path.seen', { t: fmtMs(p.last_seen_ms) }))));
  const actions = [];
  if (canOperate()) {
    for (const a of ['standby', 'online', 'maintenance']) {
      if (m.admin_state === a) continue;
      actions.push(el('button', {
        type: 'button', id: 'node-' + a + '-' + m.name, 'data-action': 'node-' + a, 'data-node': m.name,
        onclick: () => nodeAction(m, a), text: t('node.' + a),
      }));
    }
  }
  return el('article', { class: 'card node ' + tone(m.state), 'data-node': m.name, 'data-state': m.state },
    el('h3', {}, m.name, m.leader ? el('span', { class: 'badge ok' }, t('node.leader')) : null),
    el('p', {}, badge(tone(m.state) + ' big', 'state', m.state)),
    el('dl', { class: 'facts' },
      el('dt', { text: t('node.role') }), el('dd', {}, tv('role', m.role)),
      el('dt', { text: t('node.admin') }), el('dd', {}, tv('admin', m.admin_state)),
      el('dt', { text: t('node.version') }), el('dd', {}, m.version || '—'),
      el('dt', { text: t('node.pid') }), el('dd', {}, m.pid === null ? '—' : String(m.pid)),
      el('dt', { text: t('node.lease') }), el('dd', { 'data-lease': m.name }, leaseText(m.lease_ms_left)),
      el('dt', { text: t('node.paths') }), el('dd', {}, el('ul', { class: 'paths' }, paths)),
      el('dt', { text: t('node.runs') }),
      el('dd', { class: 'runs' }, runs.length ? runs.map((g) => el('span', { class: 'chip', 'data-runs': g.name }, g.name)) : '—')),
    actions.length ? el('div', { class: 'actions' }, actions) : null);
}

// ---- groups ----

function renderGroups() {
  const cards = S.groups.map((g0) => {
    const d = S.details[g0.name];
    const g = d && d.epoch >= g0.epoch ? Object.assign({}, g0, { resources: d.resources, restarts: d.restarts }) : g0;
    return groupCard(g);
  });
  if (!cards.length) cards.push(el('p', { class: 'muted' }, t('groups.none')));
  swap(document.getElementById('groups'), cards);
}

function failbackText(fb) {
  if (fb === 'auto' || fb === 'manual') return t('failback.' + fb);
  if (fb && typeof fb === 'object' && fb.window) return t('failback.window', { w: fb.window });
  return '—';
}

function groupCard(g) {
  const res = (g.resources || []).map((r) => el('tr', { 'data-resource': r.name },
    el('td', {}, r.name), el('td', {}, tv('rtype', r.type)), el('td', {}, badge(tone(r.state), 'rstate', r.state)),
    el('td', {}, r.pid === null || r.pid === undefined ? '—' : String(r.pid)),
    el('td', {}, r.last_error ? raw(r.last_error) : '—')));
  const actions = [];
  if (canOperate()) {
    const targets = g.spec.nodes.filter((n) => n !== g.node);
    actions.push(el('label', { for: 'move-to-' + g.name, text: t('group.moveTo') }),
      el('select', { id: 'move-to-' + g.name }, targets.map((n) => el('option', { value: n }, n))),
      el('button', { type: 'button', id: 'move-' + g.name, 'data-action': 'move', 'data-group': g.name,
        onclick: () => moveGroup(g), text: t('group.move') }));
    for (const a of ['start', 'stop', 'clear']) {
      actions.push(el('button', { type: 'button', id: a + '-' + g.name, 'data-action': a, 'data-group': g.name,
        onclick: () => groupAction(g, a), text: t('group.' + a) }));
    }
  }
  return el('article', { class: 'card group ' + tone(g.state), 'data-group': g.name, 'data-state': g.state, 'data-node': g.node || '' },
    el('h2', {}, g.name, ' ', badge(tone(g.state) + ' big', 'gstate', g.state)),
    el('dl', { class: 'facts' },
      el('dt', { text: t('group.node') }), el('dd', { class: 'group-node' }, g.node || '—'),
      el('dt', { text: t('group.epoch') }), el('dd', {}, String(g.epoch)),
      el('dt', { text: t('group.enabled') }), el('dd', {}, t(g.enabled ? 'yes' : 'no')),
      el('dt', { text: t('group.failback') }), el('dd', {}, failbackText(g.spec.failback)),
      el('dt', { text: t('group.nodes') }), el('dd', {}, g.spec.nodes.join(' → ')),
      el('dt', { text: t('group.failedOn') }), el('dd', {}, (g.failed_on || []).join(', ') || '—'),
      el('dt', { text: t('group.restarts') }), el('dd', {}, g.restarts === null || g.restarts === undefined ? '—' : String(g.restarts)),
      el('dt', { text: t('group.reason') }), el('dd', {}, g.reason ? raw(g.reason) : '—')),
    el('table', { class: 'grid' },
      el('caption', { text: t('group.resources') }),
      el('thead', {}, el('tr', {}, ['res.name', 'res.type', 'res.state', 'res.pid', 'res.error'].map((k) => el('th', { text: t(k) })))),
      el('tbody', {}, res.length ? res : el('tr', {}, el('td', { colspan: '5', class: 'muted', text: t('group.noResources') })))),
    actions.length ? el('div', { class: 'actions' }, actions) : null);
}

// ---- volumes ----

function renderVolumes() {
  const cards = S.volumes.map(volumeCard);
  if (!cards.length) cards.push(el('p', { class: 'muted' }, t('volumes.none')));
  swap(document.getElementById('volumes'), cards);
}

function volumeCard(v) {
  const split = v.replicas.filter((r) => r.connection === 'SplitBrain');
  const rows = v.replicas.map((r) => {
    let resync = '—';
    if (r.resync) {
      const pct = r.resync.total_bytes ? Math.floor((100 * r.resync.sent_bytes) / r.resync.total_bytes) : 0;
      resync = el('span', {},
        el('progress', { max: String(r.resync.total_bytes || 1), value: String(r.resync.sent_bytes), 'aria-label': t('vol.resync') }),
        ' ', t('vol.percent', { n: pct }),
        r.resync.eta_s === null ? null : ' ' + t('vol.eta', { t: fmtMs(Math.round(r.resync.eta_s * 1000)) }));
    }
    return el('tr', { 'data-replica': r.node },
      el('td', {}, r.node), el('td', {}, tv('vrole', r.role)), el('td', {}, badge(tone(r.disk), 'disk', r.disk)),
      el('td', {}, badge(tone(r.connection), 'conn', r.connection)), el('td', {}, tv('mode', r.mode)),
      el('td', {}, fmtBytes(r.out_of_sync_bytes)), el('td', {}, resync),
      el('td', {}, r.lag_bytes === null || r.lag_bytes === undefined ? '—' : fmtBytes(r.lag_bytes)),
      el('td', {}, r.last_error ? raw(r.last_error) : '—'));
  });
  const parts = [];
  if (split.length) {
    const choices = [];
    if (isAdmin()) {
      for (const r of v.replicas) {
        choices.push(el('button', { type: 'button', id: 'resolve-' + v.name + '-' + r.node, 'data-action': 'resolve',
          onclick: () => resolveVolume(v, r.node), text: t('vol.discard', { node: r.node }) }));
      }
    }
    parts.push(el('div', { class: 'alert', role: 'alert' },
      el('p', {}, badge('bad big', 'conn', 'SplitBrain'), ' ', t('vol.splitHelp')),
      choices.length ? el('div', { class: 'actions' }, choices) : el('p', {}, t('vol.adminResolves'))));
  }
  // The primary's latest report; the answer to our own request until it has one.
  const rep = v.verify || S.verify[v.name];
  if (rep) {
    const found = Object.entries(rep.found_blocks || {}).map(([n, b]) => t('vol.found', { node: n, n: b })).join(', ');
    parts.push(el('p', { class: 'verify' }, t('vol.verify'), ': ', tv('vstate', rep.state), ' · ',
      t('vol.checked', { b: fmtBytes(rep.checked_bytes) }), found ? ' · ' + found : '',
      rep.error ? raw(' ' + rep.error) : null));
  }
  const actions = [];
  if (canOperate()) {
    actions.push(el('button', { type: 'button', id: 'verify-' + v.name, 'data-action': 'verify',
      onclick: () => verifyVolume(v), text: t('vol.verifyNow') }));
  }
  return el('article', { class: 'card volume', 'data-volume': v.name },
    el('h2', {}, v.name),
    el('dl', { class: 'facts' },
      el('dt', { text: t('vol.group') }), el('dd', {}, v.group),
      el('dt', { text: t('vol.size') }), el('dd', {}, v.growing_to_bytes
        ? t('vol.growingTo', { size: fmtBytes(v.size_bytes), to: fmtBytes(v.growing_to_bytes) })
        : fmtBytes(v.size_bytes)),
      el('dt', { text: t('vol.mode') }), el('dd', {}, tv('mode', v.mode)),
      el('dt', { text: t('vol.primary') }), el('dd', {}, v.primary || '—')),
    parts,
    el('table', { class: 'grid' },
      el('caption', { text: t('vol.replicas') }),
      el('thead', {}, el('tr', {}, ['vol.node', 'vol.role', 'vol.disk', 'vol.connection', 'vol.mode', 'vol.oos', 'vol.resync', 'vol.lag', 'vol.error']
        .map((k) => el('th', { text: t(k) })))),
      el('tbody', {}, rows)),
    actions.length ? el('div', { class: 'actions' }, actions) : null);
}

async function verifyVolume(v) {
  const r = await act('POST', '/v1/volumes/' + encodeURIComponent(v.name) + '/verify', {}, t('action.verify', { volume: v.name }));
  if (r.status === 202 && r.body) {
    S.verify[v.name] = r.body;
    renderVolumes();
  }
}

async function resolveVolume(v, node) {
  const yes = await confirmDialog(t('vol.resolveTitle', { volume: v.name }), t('vol.resolveText', { volume: v.name, node: node }));
  if (yes) act('POST', '/v1/volumes/' + encodeURIComponent(v.name) + '/resolve', { discard: node }, t('action.resolve', { volume: v.name }));
}

// ---- events ----

// The stream is read with fetch(): EventSource cannot send a header, and
// the token must not travel in a URL. After a drop it resumes with
// Last-Event-ID, so no event is lost or shown twice.
async function startStream() {
  if (S.stream) S.stream.abort();
  const ctl = new AbortController();
  S.stream = ctl;
  while (!ctl.signal.aborted && S.token) {
    const headers = { Authorization: 'Bearer ' + S.token, Accept: 'text/event-stream' };
    if (S.lastEventId) headers['Last-Event-ID'] = String(S.lastEventId);
    try {
      const resp = await fetch('/v1/events/stream', { headers: headers, signal: ctl.signal, cache: 'no-store', credentials: 'omit' });
      if (resp.status === 401) { signOut(t('signin.expired')); return; }
      if (resp.status !== 200 || !resp.body) throw new Error('status ' + resp.status);
      setStream('live');
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          onMessage(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    if (ctl.signal.aborted) return;
    S.reconnects += 1;
    setStream('reconnecting');
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function setStream(state) {
  S.streamState = state;
  const b = document.getElementById('stream-state');
  b.className = 'badge ' + (state === 'live' ? 'ok' : 'warn');
  b.textContent = t('stream.' + state);
  b.dataset.state = state;
  b.dataset.reconnects = String(S.reconnects);
}

let refreshSoon = null;

function onMessage(block) {
  let id = null;
  let kind = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'id') id = value;
    else if (field === 'event') kind = value;
    else if (field === 'data') data.push(value);
  }
  if (kind === 'reset') {
    S.resets += 1;
    S.events.push({ id: -S.resets, reset: true, time_ms: Date.now() });
  } else if (data.length) {
    let e;
    try { e = JSON.parse(data.join('\n')); } catch (err) { return; }
    if (!S.eventIds.has(e.id)) {
      S.eventIds.add(e.id);
      S.events.push(e);
      if (S.events.length > 2000) S.events.splice(0, S.events.length - 2000);
    }
  }
  if (id !== null && /^\d+$/.test(id)) S.lastEventId = Number(id);
  // Something changed: show it now rather than at the next poll.
  if (!refreshSoon) {
    refreshSoon = setTimeout(() => { refreshSoon = null; poll(); if (S.view === 'events') renderEvents(); }, 100);
  }
}

const SEVERITY = { info: 0, warning: 1, critical: 2 };

function eventSummary(e) {
  // English: the cluster's own sentence. Chinese: the kind's name and
  // what it is about, so no screen mixes languages; the English sentence
  // stays in the tooltip.
  if (S.lang === 'en') return [raw(e.message)];
  const out = [tv('kind', e.kind)];
  if (e.group) out.push(' ', t('ev.group', { g: e.group }));
  if (e.node) out.push(' ', t('ev.node', { n: e.node }));
  if (e.details && typeof e.details.outage_ms === 'number') out.push(' ', t('ev.outage', { t: fmtMs(e.details.outage_ms) }));
  return out;
}

function renderEvents() {
  const sev = document.getElementById('f-severity').value;
  const grp = document.getElementById('f-group').value;
  const node = document.getElementById('f-node').value;
  fillFilter('f-group', S.groups.map((g) => g.name));
  fillFilter('f-node', ((S.cluster && S.cluster.members) || []).map((m) => m.name));
  const shown = S.events.filter((e) => e.reset || (
    (!sev || SEVERITY[e.severity] >= SEVERITY[sev]) && (!grp || e.group === grp) && (!node || e.node === node)));
  const items = shown.slice(-300).reverse().map((e) => {
    if (e.reset) return el('li', { class: 'reset' }, badge('warn', 'stream', 'gap'), ' ', t('events.reset'));
    return el('li', { 'data-event': String(e.id), 'data-kind': e.kind, title: e.message },
      el('time', { datetime: new Date(e.time_ms).toISOString() }, fmtTime(e.time_ms)), ' ',
      badge(tone(e.severity), 'sev', e.severity), ' ', el('span', { class: 'summary' }, eventSummary(e)));
  });
  if (!items.length) items.push(el('li', { class: 'muted' }, t('events.none')));
  swap(document.getElementById('timeline'), items);
  renderFailovers();
  setStream(S.streamState);
}

function fillFilter(id, names) {
  const s = document.getElementById(id);
  const have = [...s.options].map((o) => o.value);
  for (const n of names) if (!have.includes(n)) s.append(el('option', { value: n }, n));
}

// Each failover's outage (`group.running` with `details.outage_ms`) as a bar.
function renderFailovers() {
  const runs = S.events.filter((e) => e.kind === 'group.running' && e.details && typeof e.details.outage_ms === 'number').slice(-20);
  const box = document.getElementById('failover-chart');
  if (!runs.length) {
    swap(box, [el('p', { class: 'muted' }, t('events.nofailovers'))]);
    return;
  }
  const NS = 'http://www.w3.org/2000/svg';
  const svg = (tag, attrs, ...kids) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  };
  const max = Math.max(...runs.map((e) => e.details.outage_ms), 1);
  const bw = 48;
  const gap = 16;
  const h = 160;
  const width = runs.length * (bw + gap) + gap;
  const chart = svg('svg', { viewBox: '0 0 ' + width + ' ' + (h + 40), width: width, height: h + 40, role: 'img', 'aria-label': t('events.failovers'), id: 'failover-svg' });
  runs.forEach((e, i) => {
    const v = e.details.outage_ms;
    const bh = Math.max(2, Math.round((v / max) * (h - 20)));
    const x = gap + i * (bw + gap);
    chart.append(svg('rect', { x: x, y: h - bh, width: bw, height: bh, class: 'bar', 'data-outage': v },
      svg('title', {}, t('chart.bar', { group: e.group || '', node: e.node || '', t: fmtMs(v), when: fmtTime(e.time_ms) }))));
    chart.append(svg('text', { x: x + bw / 2, y: h - bh - 4, 'text-anchor': 'middle', class: 'value' }, fmtMs(v)));
    chart.append(svg('text', { x: x + bw / 2, y: h + 16, 'text-anchor': 'middle', class: 'label' }, e.group || ''));
    chart.append(svg('text', { x: x + bw / 2, y: h + 32, 'text-anchor': 'middle', class: 'label' }, e.node || ''));
  });
  swap(box, [chart]);
}

// ---- audit ----

function renderAudit() {
  const rows = S.audit.slice(-300).reverse().map((a) => el('tr', { 'data-audit': String(a.id) },
    el('td', {}, fmtTime(a.time_ms)), el('td', {}, raw(a.who)), el('td', {}, a.from === 'local' ? t('audit.local') : a.from),
    el('td', {}, raw(a.method + ' ' + a.path)),
    el('td', {}, el('span', { class: 'badge ' + (a.status < 400 ? 'ok' : 'bad') }, String(a.status)), a.code ? ' ' : '', a.code ? raw(a.code) : ''),
    el('td', {}, a.node)));
  if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: '6', class: 'muted', text: t('audit.none') })));
  swap(document.getElementById('audit'), rows);
}

// ---- language ----

function applyLanguage(lang) {
  S.lang = window.TANDEM_I18N[lang] ? lang : 'en';
  localStorage.setItem('tandem.lang', S.lang);
  document.documentElement.lang = S.lang === 'zh' ? 'zh-CN' : 'en';
  document.getElementById('lang').value = S.lang;
  document.title = t('title');
  for (const e of document.querySelectorAll('[data-i18n]')) e.textContent = t(e.dataset.i18n);
  for (const e of document.querySelectorAll('[data-i18n-label]')) e.setAttribute('aria-label', t(e.dataset.i18nLabel));
  document.getElementById('token').setAttribute('placeholder', t('signin.placeholder'));
  // A message in the other language would mix the screen.
  setStatus('');
  route();
}

// ---- start ----

function boot() {
  document.getElementById('signin-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    signIn(document.getElementById('token').value);
  });
  document.getElementById('signout').addEventListener('click', () => signOut(''));
  // Escape closes the dialog too (returnValue stays empty: a refusal).
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-ok').addEventListener('click', () => dialog.close('ok'));
  document.getElementById('confirm-cancel').addEventListener('click', () => dialog.close('cancel'));
  document.getElementById('lang').addEventListener('change', (ev) => applyLanguage(ev.target.value));
  for (const id of ['f-severity', 'f-group', 'f-node']) document.getElementById(id).addEventListener('change', renderEvents);
  window.addEventListener('hashchange', route);
  const saved = localStorage.getItem('tandem.lang');
  const nav = (navigator.language || '').toLowerCase();
  applyLanguage(saved || (nav.startsWith('zh') ? 'zh' : 'en'));
  if (S.token) signIn(S.token);
}

boot();
