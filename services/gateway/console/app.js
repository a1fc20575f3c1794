// Jetcall console: one page, no framework, no build step.
//
// Served by the gateway at /console under a strict CSP (script-src 'self', style-src 'self',
// connect-src 'self'), so everything here is built with createElement/textContent and styled
// through classes. Job inputs, results and error texts come from callers and receivers and are
// untrusted: nothing from the API ever goes through innerHTML.
'use strict';

// ---------------------------------------------------------------------------------------------
// Constants and state
// ---------------------------------------------------------------------------------------------

const KEY_STORAGE = 'jetcall.key';
const PAGE_SIZE = 50;
const DEAD_LETTER_LIMIT = 1000;
const REFRESH_MS = { overview: 3000, jobs: 5000, deadLetters: 5000, ages: 5000 };
const STATUSES = ['accepted', 'generating', 'completed', 'failed', 'cancelled', 'expired', 'delivered', 'undeliverable'];
const FINAL = new Set(['delivered', 'undeliverable']);
/** What `DELETE /api/v1/jobs/{id}` takes back: a job not generated yet. */
const CANCELLABLE = new Set(['accepted', 'generating']);
const SERIES = ['accepted', 'completed', 'failed', 'delivered', 'undeliverable'];
const SVG_NS = 'http://www.w3.org/2000/svg';

/** Who the gateway says we are: `{keys_required, tenant, role}`, or null before sign-in. */
let session = null;
/** The view on screen: its name, an AbortController for its requests, and its pollers. */
let ctx = null;
/** Jobs filters and paging survive leaving the view, so "back" from a job keeps them. */
const jobsState = { offset: 0 };

// ---------------------------------------------------------------------------------------------
// DOM helpers
// ---------------------------------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);

/** An element with attributes (`class`, `data-*`, anything else via setAttribute) and children
 *  (nodes or strings, which become text nodes: never markup). */
function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svgEl(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function setText(selector, text) {
  $(selector).textContent = text;
}

function show(node, visible) {
  node.hidden = !visible;
}

/** A status word with its colour class; unknown words get a neutral class (and a word with a
 *  space in it would make classList throw). */
function statusClass(status) {
  return STATUSES.includes(status) ? `st-${status}` : 'st-unknown';
}

function statusBadge(status) {
  return el('span', { class: `st ${statusClass(status)}` }, status ?? '?');
}

function jobLink(id) {
  return el('a', { href: `#/jobs/${encodeURIComponent(id)}`, 'data-focus': 'link' }, el('code', {}, id));
}

/** Runs `update`, which rebuilds the rows inside `container`, keeping keyboard focus on the same
 *  control of the same job: the tables refresh every few seconds and would otherwise throw a
 *  keyboard user back to the top of the page. */
function keepingFocus(container, update) {
  const active = document.activeElement;
  const mark = active && container.contains(active) && active.dataset.focus
    ? { id: active.closest('tr')?.dataset.jobId, focus: active.dataset.focus } : null;
  update();
  if (!mark) return;
  const row = [...container.querySelectorAll('tr[data-job-id]')].find((tr) => tr.dataset.jobId === mark.id);
  row?.querySelector(`[data-focus="${mark.focus}"]`)?.focus();
}

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

/** "12 s", "3 min", "2 h", "4 d". */
function spanText(seconds) {
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h`;
  return `${Math.floor(seconds / 86400)} d`;
}

/** "12 s ago" (or "in 5 s" for a future time). A few seconds of clock skew between browser and
 *  gateway would read "in 1 s" for something that just happened, so that counts as now. */
function ageText(iso) {
  const at = Date.parse(iso);
  if (Number.isNaN(at)) return '–';
  let seconds = Math.round((Date.now() - at) / 1000);
  if (seconds < 0 && seconds > -5) seconds = 0;
  return seconds < 0 ? `in ${spanText(-seconds)}` : `${spanText(seconds)} ago`;
}

/** Local time; the date only when it is not today. */
function localTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return '–';
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

/** A `<time>` showing the age, with the local time beside it or in its tooltip. Marked so
 *  `refreshAges` can keep the text current between API calls. */
function timeEl(iso, { withLocal = false } = {}) {
  if (!iso) return el('span', { class: 'muted' }, '–');
  const node = el('time', { datetime: iso, title: `${localTime(iso)} (${iso})`, class: 'age', 'data-age': withLocal ? 'local' : 'age' });
  node.textContent = ageLabel(node);
  return node;
}

function ageLabel(node) {
  const iso = node.getAttribute('datetime');
  return node.dataset.age === 'local' ? `${localTime(iso)} · ${ageText(iso)}` : ageText(iso);
}

function refreshAges(root) {
  for (const node of root.querySelectorAll('time[data-age]')) node.textContent = ageLabel(node);
}

/** 850 → "850 ms", 1500 → "1.5 s", 125000 → "2 min 5 s". */
function durationText(ms) {
  if (ms === undefined || ms === null) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  const seconds = Math.round(ms / 1000);
  return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
}

function latencyText(ms) {
  return ms === null || ms === undefined ? '–' : `${Math.round(ms)} ms`;
}

/** Microdollars as dollars with all six decimals: 4210 → "$0.004210". */
function costText(cost) {
  if (!cost || typeof cost.microdollars !== 'number') return '–';
  const amount = (cost.microdollars / 1e6).toFixed(6);
  return !cost.currency || cost.currency === 'USD' ? `$${amount}` : `${amount} ${cost.currency}`;
}

/** Jobs per second for chart labels: three significant digits, no trailing zeros. */
function rateText(value) {
  return value === 0 ? '0' : String(Number(value.toPrecision(3)));
}

function jsonText(value) {
  return typeof value === 'string' ? value : JSON.stringify(value, null, 2);
}

/** A job error (`{type, message}`) as one line. */
function errorText(error) {
  if (!error) return '';
  if (typeof error === 'string') return error;
  return error.type ? `${error.type}: ${error.message ?? ''}` : (error.message ?? '');
}

/** A `datetime-local` value (local time) as RFC 3339, or null when empty or unreadable. */
function localInputToIso(value) {
  if (!value) return null;
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? null : date.toISOString();
}

// ---------------------------------------------------------------------------------------------
// Error banner: failed API calls and uncaught errors
// ---------------------------------------------------------------------------------------------

/** Which part of the page put the current message up, so that part's next success can take it
 *  down again without hiding someone else's error. */
let errorSource = null;

function showError(message, source = 'page') {
  errorSource = source;
  setText('#error-text', message);
  show($('#error-banner'), true);
}

function clearError(source) {
  if (errorSource !== source) return;
  errorSource = null;
  show($('#error-banner'), false);
}

/** On a change of view, a failure of the view left behind no longer applies; an uncaught
 *  error ('page') stays up until dismissed, since nothing tells us it went away. */
function clearViewError() {
  if (errorSource && errorSource !== 'page' && errorSource !== 'session') clearError(errorSource);
}

/** Reports a failure unless it is one the page already handles: an aborted request (we left the
 *  view) or a 401 (the sign-in form is back). */
function reportError(err, what, source) {
  if (isQuiet(err)) return;
  showError(`${what}: ${err?.message ?? err}`, source);
}

function isQuiet(err) {
  return err?.name === 'AbortError' || (err instanceof ApiError && err.status === 401);
}

function wireErrorBanner() {
  $('#error-dismiss').addEventListener('click', () => {
    errorSource = null;
    show($('#error-banner'), false);
  });
  window.addEventListener('error', (event) => {
    if (!isQuiet(event.error)) showError(`Unexpected error: ${event.message}`);
  });
  window.addEventListener('unhandledrejection', (event) => {
    if (!isQuiet(event.reason)) showError(`Unexpected error: ${event.reason?.message ?? event.reason}`);
  });
}

// ---------------------------------------------------------------------------------------------
// API client
// ---------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.type = type;
  }
}

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function authHeaders(key = storedKey()) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Calls the gateway and answers the parsed JSON. A non-2xx answer throws an ApiError carrying
 *  the API's `message`; a 401 once signed in also sends the page back to the sign-in form. */
async function api(path, { method = 'GET', body, signal, key } = {}) {
  const headers = { Accept: 'application/json', ...authHeaders(key) };
  const init = { method, headers, signal, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new ApiError(0, 'network', `could not reach the gateway (${err.message})`);
  }
  await throwUnlessOk(response);
  return response.status === 204 ? null : response.json();
}

async function throwUnlessOk(response) {
  if (response.ok) return;
  let data = null;
  try {
    data = await response.json();
  } catch {
    // Not JSON (a proxy's error page, say): the status line has to do.
  }
  const type = data?.type ?? 'http';
  const message = data?.message ?? `${type === 'http' ? 'HTTP' : type} ${response.status} ${response.statusText}`.trim();
  if (response.status === 401) signedOutByGateway();
  throw new ApiError(response.status, type, message);
}

/** `api` for the view on screen: its requests are aborted when the view is left. */
function viewApi(path, options = {}) {
  return api(path, { ...options, signal: ctx?.abort.signal });
}

// ---------------------------------------------------------------------------------------------
// Live refresh: pollers that stop when the view is left or the tab is hidden
// ---------------------------------------------------------------------------------------------

/** Runs `load` now and again `ms` after each run ends (never two at once), while the view that
 *  started it is on screen and the tab is visible. Answers a handle whose `now()` reloads at
 *  once (after a filter change, say). */
function poll(load, ms, what, source) {
  const view = ctx;
  const poller = { load, ms, what, source, timer: null, running: false, again: false };
  poller.now = () => runPoller(view, poller);
  view.pollers.push(poller);
  poller.now();
  return poller;
}

async function runPoller(view, poller) {
  clearTimeout(poller.timer);
  poller.timer = null;
  if (view !== ctx || document.visibilityState === 'hidden') return;
  if (poller.running) {
    poller.again = true; // A run is under way with stale inputs: run again when it ends.
    return;
  }
  poller.running = true;
  try {
    await poller.load(view);
    if (view === ctx) clearError(poller.source);
  } catch (err) {
    if (view === ctx) reportError(err, poller.what, poller.source);
  } finally {
    poller.running = false;
  }
  if (poller.again) {
    poller.again = false;
    runPoller(view, poller);
  } else if (view === ctx && document.visibilityState !== 'hidden') {
    poller.timer = setTimeout(() => runPoller(view, poller), poller.ms);
  }
}

function stopPollers(view) {
  for (const poller of view?.pollers ?? []) {
    clearTimeout(poller.timer);
    poller.timer = null;
  }
}

function wireVisibility() {
  document.addEventListener('visibilitychange', () => {
    if (!ctx) return;
    if (document.visibilityState === 'hidden') stopPollers(ctx);
    else for (const poller of ctx.pollers) poller.now();
  });
}

// ---------------------------------------------------------------------------------------------
// Confirmation dialog (never window.confirm)
// ---------------------------------------------------------------------------------------------

let answerConfirm = null;

/** Asks in `<dialog id="confirm">`; resolves true for OK, false for Cancel or Escape. */
function confirmAction(message, okLabel = 'OK') {
  const dialog = $('#confirm');
  answerConfirm?.(false);
  const opener = document.activeElement;
  setText('#confirm-message', message);
  setText('#confirm-ok', okLabel);
  return new Promise((resolve) => {
    answerConfirm = (answer) => {
      answerConfirm = null;
      if (dialog.open) dialog.close();
      if (opener?.isConnected) opener.focus();
      resolve(answer);
    };
    dialog.showModal();
    $('#confirm-ok').focus();
  });
}

function wireConfirm() {
  const dialog = $('#confirm');
  $('#confirm-ok').addEventListener('click', () => answerConfirm?.(true));
  $('#confirm-cancel').addEventListener('click', () => answerConfirm?.(false));
  dialog.addEventListener('cancel', (event) => {
    event.preventDefault(); // Escape: we close it ourselves, so the promise always settles.
    answerConfirm?.(false);
  });
  dialog.addEventListener('close', () => answerConfirm?.(false));
}

// ---------------------------------------------------------------------------------------------
// Session: whoami, sign-in, sign-out
// ---------------------------------------------------------------------------------------------

/** Asks the gateway who the stored key (if any) is. 401 means a key is needed. */
async function startSession() {
  show($('#loading'), true);
  try {
    enterSession(await api('/api/v1/whoami'));
  } catch (err) {
    show($('#loading'), false);
    if (err instanceof ApiError && err.status === 401) {
      const hadKey = storedKey() !== null;
      sessionStorage.removeItem(KEY_STORAGE);
      showSignin(hadKey ? 'The key saved in this tab was refused; sign in again.' : null);
    } else {
      // The gateway may be restarting: say so and try again shortly.
      reportError(err, 'Could not load the console', 'session');
      setTimeout(startSession, 5000);
    }
  }
}

function enterSession(who) {
  session = who;
  clearError('session');
  show($('#loading'), false);
  show($('#signin'), false);
  const admin = who.role === 'admin';
  setText('#who', who.keys_required ? `${who.tenant ?? 'no tenant'} · ${who.role}` : `open gateway · ${who.role}`);
  show($('#who'), true);
  show($('#signout'), Boolean(who.keys_required));
  show($('#warning-open'), who.keys_required === false);
  show($('nav a[href="#/overview"]'), admin);
  show($('nav a[href="#/dead-letters"]'), admin);
  show($('nav'), true);
  // A user key only ever sees its own tenant, so a tenant filter would be noise; without keys
  // no job has a tenant, so the column would be empty.
  show($('#filter-tenant-label'), admin);
  show($('#filter-tenant'), admin);
  $('#jobs-table').classList.toggle('hide-tenant', !(admin && who.keys_required));
  route();
}

function showSignin(note) {
  leaveView();
  session = null;
  for (const view of document.querySelectorAll('.view')) show(view, false);
  show($('nav'), false);
  show($('#who'), false);
  show($('#signout'), false);
  show($('#warning-open'), false);
  show($('#signin-error'), false);
  setText('#signin-note', note ?? '');
  show($('#signin-note'), Boolean(note));
  show($('#signin'), true);
  $('#signin-key').value = '';
  $('#signin-key').focus();
}

/** A 401 on any call after sign-in: the key was revoked or the gateway restarted with keys. */
function signedOutByGateway() {
  if (!session) return;
  sessionStorage.removeItem(KEY_STORAGE);
  forgetData();
  showSignin('The gateway no longer accepts this key; sign in again.');
}

/** Clears what the last key could see, so the next key (maybe another tenant) never sees it. */
function forgetData() {
  $('#consumers tbody').replaceChildren();
  $('#jobs-table tbody').replaceChildren();
  $('#destinations').replaceChildren();
  clearJobView();
  for (const id of ['#replay-result', '#jobs-note', '#budget', '#dead-letters-note', '#overview-note']) show($(id), false);
}

async function submitSignin(event) {
  event.preventDefault();
  const key = $('#signin-key').value.trim();
  if (!key) return;
  const button = $('#signin-submit');
  button.disabled = true;
  show($('#signin-error'), false);
  try {
    const who = await api('/api/v1/whoami', { key });
    sessionStorage.setItem(KEY_STORAGE, key);
    $('#signin-key').value = '';
    enterSession(who);
  } catch (err) {
    setText('#signin-error', err.status === 401 ? 'That key was not accepted.' : `Sign-in failed: ${err.message}`);
    show($('#signin-error'), true);
    $('#signin-key').select();
  } finally {
    button.disabled = false;
  }
}

function signOut() {
  sessionStorage.removeItem(KEY_STORAGE);
  forgetData();
  showSignin('Signed out.');
}

function wireSession() {
  $('#signin').addEventListener('submit', submitSignin);
  $('#signout').addEventListener('click', signOut);
}

// ---------------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------------

const VIEWS = {
  overview: { section: '#overview', title: 'Overview', nav: '#/overview', admin: true, enter: enterOverview },
  jobs: { section: '#jobs', title: 'Jobs', nav: '#/jobs', admin: false, enter: enterJobs },
  job: { section: '#job', title: 'Job', nav: '#/jobs', admin: false, enter: enterJob },
  'dead-letters': { section: '#dead-letters', title: 'Dead letters', nav: '#/dead-letters', admin: true, enter: enterDeadLetters },
};

/** `#/jobs/JOB-1` → `{name: 'job', id: 'JOB-1'}`; anything unknown → null. */
function parseHash(hash) {
  const path = hash.replace(/^#\/?/, '');
  if (path === 'overview' || path === 'jobs' || path === 'dead-letters') return { name: path };
  const match = /^jobs\/(.+)$/.exec(path);
  if (match) {
    try {
      return { name: 'job', id: decodeURIComponent(match[1]) };
    } catch {
      return null;
    }
  }
  return null;
}

function leaveView() {
  if (!ctx) return;
  ctx.abort.abort(); // Ends the view's fetches and its event stream.
  stopPollers(ctx);
  ctx = null;
}

function route({ focus = false } = {}) {
  if (!session) return;
  const admin = session.role === 'admin';
  let target = parseHash(location.hash);
  if (!target || (VIEWS[target.name].admin && !admin)) {
    // The default view, and the one a user key lands on instead of an admin-only view.
    target = { name: admin ? 'overview' : 'jobs' };
    history.replaceState(null, '', `#/${target.name}`);
  }
  leaveView();
  clearViewError();
  const view = VIEWS[target.name];
  for (const [name, other] of Object.entries(VIEWS)) show($(other.section), name === target.name);
  for (const link of document.querySelectorAll('nav a')) {
    if (link.getAttribute('href') === view.nav) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  document.title = `${target.id ?? view.title} · Jetcall`;
  ctx = { name: target.name, abort: new AbortController(), pollers: [] };
  view.enter(ctx, target);
  // Moving focus to the heading tells keyboard and screen-reader users the page changed.
  if (focus) $(`${view.section} h1`).focus({ preventScroll: false });
}

function wireRouter() {
  window.addEventListener('hashchange', () => route({ focus: true }));
}

// ---------------------------------------------------------------------------------------------
// Overview view
// ---------------------------------------------------------------------------------------------

function enterOverview() {
  poll(loadOverview, REFRESH_MS.overview, 'Loading the overview failed', 'overview');
}

async function loadOverview(view) {
  const data = await viewApi('/api/v1/overview');
  if (view !== ctx) return;
  const minutes = Math.round((data.window_seconds ?? 900) / 60);
  setText('#overview-window', `${minutes} min`);
  setText('#overview-asof', localTime(data.now));
  setText('#overview-note', data.catching_up ? 'The gateway is still reading history: numbers are still filling in.' : '');
  show($('#overview-note'), Boolean(data.catching_up));
  for (const name of SERIES) {
    setText(`#total-${name}`, String(data.totals?.[name] ?? 0));
    const svg = $(`svg.chart[data-series="${name}"]`);
    drawChart(svg, data.series?.[name] ?? [], minutes, name);
  }
  renderLatency(data.latency_ms ?? {});
  renderConsumers(data.consumers ?? []);
  renderGenerator(data.generator ?? {});
  setText('#dead-letter-count', String(data.dead_letters ?? 0));
  show($('#dead-letter-partial'), data.dead_letters_complete === false);
}

/** A line chart drawn by hand: y axis from 0 to a round maximum (labelled), x axis from the
 *  window's start ("-15 min") to "now", and the latest value in the top right corner. */
function drawChart(svg, values, minutes, name) {
  const [width, height] = [320, 130];
  const plot = { left: 8, right: width - 8, top: 24, bottom: height - 22 };
  const max = niceCeiling(Math.max(0, ...values));
  const latest = values.length ? values[values.length - 1] : 0;
  const x = (i) => plot.left + (values.length > 1 ? (i * (plot.right - plot.left)) / (values.length - 1) : 0);
  const y = (v) => plot.bottom - (Math.max(0, v) / max) * (plot.bottom - plot.top);
  const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);

  const children = [
    svgEl('title', {}, `${name}: ${rateText(latest)} per second now, at most ${rateText(max)} on this scale`),
    svgEl('line', { class: 'grid', x1: plot.left, y1: plot.top, x2: plot.right, y2: plot.top }),
    svgEl('line', { class: 'axis', x1: plot.left, y1: plot.top, x2: plot.left, y2: plot.bottom }),
    svgEl('line', { class: 'axis', x1: plot.left, y1: plot.bottom, x2: plot.right, y2: plot.bottom }),
    svgEl('text', { class: 'label', x: plot.left, y: plot.top - 8 }, `max ${rateText(max)}/s`),
    svgEl('text', { class: 'label', x: plot.left, y: height - 6 }, `-${minutes} min`),
    svgEl('text', { class: 'label', x: plot.right, y: height - 6, 'text-anchor': 'end' }, 'now'),
    svgEl('text', { class: 'value', x: plot.right, y: plot.top - 8, 'text-anchor': 'end' }, `${rateText(latest)}/s`),
  ];
  if (points.length > 1) {
    const area = [`${plot.left},${plot.bottom}`, ...points, `${plot.right},${plot.bottom}`].join(' ');
    children.push(svgEl('polygon', { class: 'area', points: area }));
    children.push(svgEl('polyline', { class: 'line', points: points.join(' ') }));
    children.push(svgEl('circle', { class: 'dot', cx: x(values.length - 1), cy: y(latest), r: 2.5 }));
  }
  svg.replaceChildren(...children);
  svg.setAttribute('aria-label', `${name} per second: ${rateText(latest)} now`);
}

/** 0.37 → 0.5, 3.2 → 5, 7 → 10; at least 1 so an idle chart has a sane scale. */
function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  const step = [1, 2, 5, 10].find((s) => value <= s * magnitude);
  return Math.max(step * magnitude, value < 1 ? 0.1 : 1);
}

function renderLatency(latency) {
  for (const q of ['p50', 'p90', 'p99', 'max']) setText(`#latency-${q}`, latencyText(latency[q]));
  setText('#latency-count', String(latency.count ?? 0));
}

function renderConsumers(consumers) {
  const rows = consumers.map((c) =>
    el('tr', { 'data-consumer': c.name },
      el('th', { scope: 'row' }, c.name),
      el('td', { class: 'num waiting' }, String(c.waiting ?? 0)),
      el('td', { class: 'num in-flight' }, String(c.in_flight ?? 0)),
      el('td', { class: 'num oldest' }, c.oldest_unfinished_seconds == null ? '–' : durationText(c.oldest_unfinished_seconds * 1000)),
      el('td', { class: 'num redelivered' }, String(c.redelivered ?? 0))));
  $('#consumers tbody').replaceChildren(...rows);
}

function renderGenerator(gen) {
  const state = $('#generator-state');
  state.textContent = gen.paused ? `paused: ${gen.reason ?? 'no reason given'}` : 'running';
  state.className = gen.paused ? 'gen-paused' : 'gen-running';
  const until = $('#generator-until');
  until.textContent = gen.paused && gen.paused_until ? `until ${localTime(gen.paused_until)} (${ageText(gen.paused_until)})` : '';
  show(until, Boolean(gen.paused && gen.paused_until));
  const instances = gen.instances ?? [];
  $('#generator-instances').replaceChildren(...instances.map((i) =>
    el('li', {}, el('code', {}, i.instance), ' paused', i.since ? ` since ${localTime(i.since)}` : '', i.reason ? `: ${i.reason}` : '')));
  show($('#generator-instances'), instances.length > 0);
}

// ---------------------------------------------------------------------------------------------
// Jobs view
// ---------------------------------------------------------------------------------------------

function enterJobs() {
  ctx.jobsPoller = poll(loadJobs, REFRESH_MS.jobs, 'Loading jobs failed', 'jobs');
}

function jobsQuery() {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(jobsState.offset) });
  const status = $('#filter-status').value;
  const kind = $('#filter-kind').value.trim();
  const tenant = $('#filter-tenant').hidden ? '' : $('#filter-tenant').value.trim();
  const since = localInputToIso($('#filter-since').value);
  if (status) params.set('status', status);
  if (kind) params.set('kind', kind);
  if (tenant) params.set('tenant', tenant);
  if (since) params.set('since', since);
  return params;
}

async function loadJobs(view) {
  const [data, budget] = await Promise.all([
    viewApi(`/api/v1/jobs?${jobsQuery()}`),
    // Budgets belong to keys: an open gateway has none.
    session?.keys_required ? viewApi('/api/v1/budget') : null,
  ]);
  if (view !== ctx) return;
  showBudget(budget);
  const jobs = data.jobs ?? [];
  const rows = jobs.map(jobRow);
  if (!rows.length) rows.push(el('tr', { class: 'empty' }, el('td', { colspan: 10 }, 'No jobs match these filters.')));
  const tbody = $('#jobs-table tbody');
  keepingFocus(tbody, () => tbody.replaceChildren(...rows));
  const offset = data.offset ?? jobsState.offset;
  $('#page-prev').disabled = offset <= 0;
  $('#page-next').disabled = !data.more;
  setText('#page-info', jobs.length ? `${offset + 1}–${offset + jobs.length}` : '');
  const note = data.complete === false ? `Only the newest ${data.scanned} status changes were scanned: older jobs may be missing.` : '';
  setText('#jobs-note', note);
  show($('#jobs-note'), Boolean(note));
}

/** The key's budget above its jobs: what each limited period has used and has left. */
function showBudget(budget) {
  const periods = budget?.periods ?? [];
  const parts = periods.map((p) => {
    const name = p.period === 'day' ? 'Today' : 'This month';
    return `${name}: ${dollars(p.used)} of ${dollars(p.limit)} used, ${dollars(p.remaining)} left (resets ${localTime(p.resets_at)})`;
  });
  setText('#budget', parts.length ? `Budget · ${parts.join(' · ')}` : '');
  show($('#budget'), parts.length > 0);
}

/** `{microdollars}` as dollars, to the cent when that is exact. */
function dollars(cost) {
  const micro = cost?.microdollars ?? 0;
  return `$${(micro / 1e6).toFixed(micro % 10000 === 0 ? 2 : 6)}`;
}

function jobRow(job) {
  return el('tr', { 'data-job-id': job.job_id },
    el('td', { class: 'id' }, jobLink(job.job_id)),
    el('td', { class: 'status' }, statusBadge(job.status)),
    el('td', { class: 'kind' }, job.kind ?? ''),
    el('td', { class: 'col-tenant' }, job.tenant ?? ''),
    el('td', { class: 'age' }, timeEl(job.updated_at)),
    el('td', { class: 'created' }, job.created_at ? localTime(job.created_at) : '–'),
    el('td', { class: 'num' }, String(job.generation_attempts ?? 0)),
    el('td', { class: 'num' }, String(job.delivery_attempts ?? 0)),
    el('td', { class: 'destination' }, job.destination ?? ''),
    truncatedCell(errorText(job.error) || job.last_delivery_error || ''));
}

/** A cell that clips long (untrusted, possibly huge) text and keeps all of it in a tooltip. */
function truncatedCell(text) {
  return el('td', { class: 'clip', title: text || null }, text);
}

/** Filter changes reload from the first page; typing is debounced so each key is not a call. */
function wireJobs() {
  let debounce = null;
  const reload = () => {
    clearTimeout(debounce);
    jobsState.offset = 0;
    if (ctx?.name === 'jobs') ctx.jobsPoller.now();
  };
  $('#filters').addEventListener('input', () => {
    clearTimeout(debounce);
    debounce = setTimeout(reload, 350);
  });
  $('#filters').addEventListener('change', reload);
  $('#filters').addEventListener('submit', (event) => {
    event.preventDefault();
    reload();
  });
  $('#filter-clear').addEventListener('click', () => {
    $('#filters').reset();
    reload();
  });
  const page = (delta) => {
    jobsState.offset = Math.max(0, jobsState.offset + delta);
    if (ctx?.name === 'jobs') ctx.jobsPoller.now();
  };
  $('#page-prev').addEventListener('click', () => page(-PAGE_SIZE));
  $('#page-next').addEventListener('click', () => page(PAGE_SIZE));
  $('#search-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const id = $('#search-id').value.trim();
    if (id) location.hash = `#/jobs/${encodeURIComponent(id)}`;
  });
}

// ---------------------------------------------------------------------------------------------
// Job view: the job, live from its event stream
// ---------------------------------------------------------------------------------------------

function clearJobView() {
  setText('#job-id', '');
  const status = $('#job-status');
  status.textContent = '';
  status.className = 'status';
  setText('#job-live', '');
  $('#btn-redeliver').disabled = true;
  $('#btn-cancel-job').disabled = true;
  for (const id of ['#job-facts', '#timeline', '#job-sections']) $(id).replaceChildren();
  for (const id of ['#job-action-result', '#curl-text', '#job-missing']) show($(id), false);
  show($('#job-body'), true);
}

async function enterJob(view, { id }) {
  clearJobView();
  view.jobId = id;
  view.job = null;
  $('#job').setAttribute('data-job-id', id);
  setText('#job-id', id);
  poll(async () => refreshAges($('#job')), REFRESH_MS.ages, 'Updating ages failed', 'ages');
  try {
    const job = await viewApi(`/api/v1/jobs/${encodeURIComponent(id)}`);
    if (view !== ctx) return;
    renderJob(view, job);
    if (!FINAL.has(job.status)) followJob(view);
    else setText('#job-live', 'final');
  } catch (err) {
    if (view !== ctx || isQuiet(err)) return;
    if (err.status === 404) {
      setText('#job-missing', `No job with id ${id} (or it belongs to another API key).`);
      show($('#job-missing'), true);
      show($('#job-body'), false);
    }
    reportError(err, `Loading job ${id} failed`, 'job');
  }
}

/** Follows the job's events until a final state, the stream's end, or leaving the view. An
 *  EventSource cannot send the Authorization header, so this reads the SSE framing itself. A
 *  dropped connection is retried a few times with Last-Event-ID, which resumes after it. */
async function followJob(view, attempt = 0) {
  setText('#job-live', '● live');
  const headers = { Accept: 'text/event-stream', ...authHeaders() };
  if (view.lastEventId) headers['Last-Event-ID'] = view.lastEventId;
  try {
    const response = await fetch(`/api/v1/jobs/${encodeURIComponent(view.jobId)}/events`, {
      headers, signal: view.abort.signal, cache: 'no-store',
    });
    if (response.status === 204) return setText('#job-live', 'final');
    await throwUnlessOk(response);
    await readSse(response.body, (event) => onJobEvent(view, event));
    if (view === ctx) setText('#job-live', FINAL.has(view.job?.status) ? 'final' : 'stream ended');
  } catch (err) {
    if (view !== ctx || isQuiet(err)) return;
    const retryable = !(err instanceof ApiError) || err.status >= 500;
    if (retryable && attempt < 3) {
      setText('#job-live', 'reconnecting…');
      setTimeout(() => view === ctx && followJob(view, attempt + 1), 2000 * (attempt + 1));
      return;
    }
    setText('#job-live', 'not live');
    reportError(err, 'Live updates stopped', 'job');
  }
}

function onJobEvent(view, event) {
  if (view !== ctx) return;
  if (event.id) view.lastEventId = event.id;
  if (event.type === 'status') {
    renderJob(view, JSON.parse(event.data));
  } else if (event.type === 'removed') {
    setText('#job-missing', event.data || 'This job is no longer recorded.');
    show($('#job-missing'), true);
  }
}

/** Parses a text/event-stream body: `field: value` lines, an event per blank line, `:` lines
 *  are comments (keep-alives). Lines may end in \n, \r\n or \r, split anywhere across chunks. */
async function readSse(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = { type: 'message', data: [], id: null };
  const dispatch = () => {
    if (event.data.length) onEvent({ type: event.type, data: event.data.join('\n'), id: event.id });
    event = { type: 'message', data: [], id: null };
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
      // A lone \r at the very end may be the first half of \r\n: wait for the next chunk.
      if (buffer[end] === '\r' && end === buffer.length - 1) break;
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + (buffer.startsWith('\r\n', end) ? 2 : 1));
      if (line === '') dispatch();
      else if (!line.startsWith(':')) sseField(event, line);
    }
  }
}

function sseField(event, line) {
  const colon = line.indexOf(':');
  const field = colon < 0 ? line : line.slice(0, colon);
  let value = colon < 0 ? '' : line.slice(colon + 1);
  if (value.startsWith(' ')) value = value.slice(1);
  if (field === 'event') event.type = value;
  else if (field === 'data') event.data.push(value);
  else if (field === 'id') event.id = value;
}

function renderJob(view, job) {
  view.job = job;
  const status = $('#job-status');
  status.textContent = job.status;
  status.className = `status st ${statusClass(job.status)}`;
  $('#btn-redeliver').disabled = job.status !== 'undeliverable';
  $('#btn-cancel-job').disabled = !CANCELLABLE.has(job.status);
  $('#job-facts').replaceChildren(...jobFacts(job));
  $('#timeline').replaceChildren(...timeline(job));
  $('#job-sections').replaceChildren(...jobSections(job));
}

function jobFacts(job) {
  const facts = [
    ['Kind', job.kind],
    ['Tenant', job.tenant],
    ['Created', timeEl(job.created_at, { withLocal: true })],
    ['Updated', timeEl(job.updated_at, { withLocal: true })],
    ['Callback URL', job.callback_url && el('code', {}, job.callback_url)],
    ['Model', job.model],
    ['Generation attempts', String(job.generation_attempts ?? 0)],
    ['Delivery round', String(job.delivery_round ?? 0)],
  ];
  return facts.filter(([, value]) => value !== undefined && value !== null && value !== '')
    .flatMap(([label, value]) => [el('dt', {}, label), el('dd', {}, value)]);
}

/** One entry per thing that happened, oldest first; `data-step` names the kind of entry. */
function timeline(job) {
  const entries = [step('accepted', 'Accepted', job.created_at, `kind ${job.kind}`)];
  // `generations` holds the attempts that did not complete; the one that did is attempt
  // `generation_attempts`, ended at `finished_at`, and one under way is `generating`.
  const logged = job.generations ?? [];
  for (const gen of logged) entries.push(generationStep(gen));
  const last = job.generation_attempts ?? 0;
  const lastLogged = logged.some((gen) => gen.attempt === last);
  if (job.status === 'generating' && !lastLogged) {
    entries.push(step('generation', `Generation attempt ${last || 1}`, null,
      el('div', { class: 'step-detail' }, el('span', { class: 'outcome outcome-pending' }, 'in progress'))));
  } else if (job.result !== undefined && last > 0 && !lastLogged) {
    entries.push(step('generation', `Generation attempt ${last}`, job.finished_at,
      el('div', { class: 'step-detail' }, el('span', { class: 'outcome outcome-completed' }, 'completed'))));
  }
  if (job.ended_as === 'cancelled') entries.push(step('cancelled', 'Cancelled', job.finished_at, errorText(job.error)));
  else if (job.ended_as === 'expired') entries.push(step('expired', 'Expired', job.finished_at, errorText(job.error)));
  else if (job.error) entries.push(step('failed', 'Failed', job.finished_at, errorText(job.error)));
  else if (job.result !== undefined) entries.push(step('completed', 'Completed', job.finished_at, job.model ? `by ${job.model}` : ''));
  const perRound = new Map();
  for (const attempt of job.deliveries ?? []) {
    const n = (perRound.get(attempt.round ?? 0) ?? 0) + 1;
    perRound.set(attempt.round ?? 0, n);
    entries.push(deliveryStep(attempt, n));
  }
  if (job.status === 'delivered') entries.push(step('delivered', 'Delivered', job.delivered_at, ''));
  if (job.status === 'undeliverable') {
    entries.push(step('undeliverable', 'Undeliverable', job.updated_at, 'delivery gave up; it can be redelivered'));
  }
  return entries;
}

function step(kind, title, at, ...details) {
  return el('li', { 'data-step': kind, class: `step step-${kind}` },
    el('div', { class: 'step-head' }, el('strong', {}, title), at ? timeEl(at, { withLocal: true }) : null),
    ...details.filter(Boolean).map((d) => (d instanceof Node ? d : el('div', { class: 'step-detail' }, d))));
}

function generationStep(gen) {
  const took = gen.started_at && gen.ended_at ? durationText(Date.parse(gen.ended_at) - Date.parse(gen.started_at)) : null;
  const outcome = gen.outcome ?? 'in progress';
  return step('generation', `Generation attempt ${gen.attempt}`, gen.started_at,
    el('div', { class: 'step-detail' }, el('span', { class: `outcome outcome-${gen.outcome ?? 'pending'}` }, outcome), took ? ` after ${took}` : ''),
    errorText(gen.error),
    gen.retry_in_ms != null ? `retry in ${durationText(gen.retry_in_ms)}` : '');
}

function deliveryStep(attempt, n) {
  const round = attempt.round ? ` (redelivery round ${attempt.round})` : '';
  const waitNote = attempt.error_kind === 'circuit_open';
  const result = attempt.status_code ? `HTTP ${attempt.status_code}` : (attempt.error_kind ?? 'sent');
  const ok = !attempt.error_kind && attempt.status_code >= 200 && attempt.status_code < 300;
  return step('delivery', waitNote ? `Delivery waiting${round}` : `Delivery attempt ${n}${round}`, attempt.at,
    el('div', { class: 'step-detail' },
      el('span', { class: `outcome ${ok ? 'outcome-completed' : 'outcome-retry'}` }, result),
      attempt.status_code && attempt.error_kind && attempt.error_kind !== 'http_status' ? ` ${attempt.error_kind}` : '',
      waitNote ? '' : ` in ${durationText(attempt.duration_ms)}`),
    attempt.error ? el('div', { class: 'step-detail clip-lines' }, attempt.error) : '',
    attempt.response_excerpt ? el('div', { class: 'step-detail' }, 'response: ', el('code', { class: 'excerpt' }, attempt.response_excerpt)) : '');
}

function jobSections(job) {
  const sections = [block('Input', 'job-input', el('pre', { class: 'code' }, jsonText(job.input ?? {})))];
  if (job.metadata) sections.push(block('Metadata', 'job-metadata', el('pre', { class: 'code' }, jsonText(job.metadata))));
  if (job.result !== undefined) sections.push(block('Result', 'job-result', el('pre', { class: 'code' }, jsonText(job.result))));
  if (job.error) sections.push(block('Error', 'job-error', el('p', { class: 'form-error' }, errorText(job.error))));
  if (job.usage) {
    const rows = Object.entries(job.usage).flatMap(([k, v]) => [el('dt', {}, k.replaceAll('_', ' ')), el('dd', {}, String(v))]);
    sections.push(block('Usage', 'job-usage', el('dl', { class: 'kv' }, rows)));
  }
  sections.push(block('Cost', 'job-cost', el('p', {}, job.cost ? costText(job.cost) : 'no price for this model, or nothing charged yet')));
  sections.push(block('Trace id', 'job-trace', el('p', {}, job.trace_id ? el('code', {}, job.trace_id) : '–')));
  return sections;
}

function block(title, id, content) {
  return el('section', { id, class: 'job-section' }, el('h2', {}, title), content);
}

async function redeliverJob() {
  const view = ctx;
  if (view?.name !== 'job' || !view.job) return;
  const where = view.job.callback_url ? ` to ${view.job.callback_url}` : '';
  if (!(await confirmAction(`Redeliver job ${view.jobId}${where}? It gets a fresh round of delivery attempts.`, 'Redeliver'))) return;
  if (view !== ctx) return; // Left the view (browser Back) while the dialog was open.
  try {
    const answer = await viewApi(`/api/v1/jobs/${encodeURIComponent(view.jobId)}/redeliver`, { method: 'POST' });
    actionResult(`Redelivery requested: round ${answer.delivery_round}, status ${answer.status}.`);
    // The stream ended at `undeliverable`; the job is moving again, so follow it afresh.
    view.lastEventId = null;
    if (view === ctx) followJob(view);
  } catch (err) {
    if (isQuiet(err)) return;
    actionResult(`Redelivery failed: ${err.message}`);
    reportError(err, 'Redelivery failed', 'job-action');
  }
}

async function cancelJob() {
  const view = ctx;
  if (view?.name !== 'job' || !view.job) return;
  const what = view.job.status === 'generating' ? ' Its call to the model is abandoned.' : '';
  if (!(await confirmAction(`Cancel job ${view.jobId}?${what} Its webhook will say job.cancelled.`, 'Cancel job'))) return;
  if (view !== ctx) return;
  try {
    const answer = await viewApi(`/api/v1/jobs/${encodeURIComponent(view.jobId)}`, { method: 'DELETE' });
    actionResult(`Cancelled: status ${answer.status}.`);
    if (view === ctx) renderJob(view, answer);
  } catch (err) {
    if (isQuiet(err)) return;
    actionResult(`Cancellation failed: ${err.message}`);
    reportError(err, 'Cancellation failed', 'job-action');
  }
}

function actionResult(text) {
  setText('#job-action-result', text);
  show($('#job-action-result'), true);
}

/** Puts a ready-to-run command on the clipboard. The key stays in an environment variable
 *  (double quotes so the shell expands it) rather than being copied into shell history. */
async function copyCurl() {
  const id = ctx?.jobId;
  if (!id) return;
  const url = `${location.origin}/api/v1/jobs/${encodeURIComponent(id)}`;
  const command = `curl -H "Authorization: Bearer $JETCALL_API_KEY" '${url}'`;
  const pre = $('#curl-text');
  pre.textContent = command;
  try {
    await navigator.clipboard.writeText(command);
    actionResult('Copied the curl command to the clipboard.');
    show(pre, true);
  } catch {
    // No clipboard (plain http on another host, or permission refused): show it to select.
    actionResult('The clipboard is not available here: select the command below and copy it.');
    show(pre, true);
    getSelection()?.selectAllChildren(pre);
    pre.focus();
  }
}

function wireJob() {
  $('#btn-redeliver').addEventListener('click', redeliverJob);
  $('#btn-cancel-job').addEventListener('click', cancelJob);
  $('#btn-copy-curl').addEventListener('click', copyCurl);
}

// ---------------------------------------------------------------------------------------------
// Dead letters view
// ---------------------------------------------------------------------------------------------

function enterDeadLetters() {
  show($('#replay-result'), false);
  ctx.deadPoller = poll(loadDeadLetters, REFRESH_MS.deadLetters, 'Loading dead letters failed', 'dead-letters');
}

async function loadDeadLetters(view) {
  const data = await viewApi(`/api/v1/jobs?status=undeliverable&limit=${DEAD_LETTER_LIMIT}`);
  if (view !== ctx) return;
  const groups = groupByDestination(data.jobs ?? []);
  const container = $('#destinations');
  keepingFocus(container, () => {
    container.replaceChildren(...[...groups].map(([destination, jobs]) => destinationSection(destination, jobs)));
    if (!groups.size) container.append(el('p', { class: 'empty-state' }, 'No dead letters: every delivery has succeeded or is still being retried.'));
  });
  const notes = [];
  if (data.more) notes.push(`Showing the newest ${DEAD_LETTER_LIMIT}; there are more.`);
  if (data.complete === false) notes.push(`Only the newest ${data.scanned} status changes were scanned: older dead letters may be missing.`);
  setText('#dead-letters-note', notes.join(' '));
  show($('#dead-letters-note'), notes.length > 0);
}

/** Jobs by `destination` (host:port), in the listing's order (newest first). */
function groupByDestination(jobs) {
  const groups = new Map();
  for (const job of jobs) {
    const key = job.destination ?? 'unknown destination';
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(job);
  }
  return groups;
}

function destinationSection(destination, jobs) {
  const lastError = jobs.find((j) => j.last_delivery_error)?.last_delivery_error ?? errorText(jobs[0].error);
  const tenants = jobs.some((j) => j.tenant); // Without API keys there are none: no empty column.
  const rows = jobs.map((job) => el('tr', { 'data-job-id': job.job_id },
    el('td', {}, jobLink(job.job_id)),
    el('td', {}, job.kind ?? ''),
    tenants && el('td', {}, job.tenant ?? ''),
    el('td', { class: 'age' }, timeEl(job.updated_at)),
    el('td', { class: 'num' }, String(job.delivery_attempts ?? 0)),
    truncatedCell(job.last_delivery_error ?? ''),
    el('td', {}, el('button', { type: 'button', class: 'replay', 'data-focus': 'replay', 'aria-label': `Replay job ${job.job_id}` }, 'Replay'))));
  const headings = ['Job', 'Kind', tenants && 'Tenant', 'Updated', 'Attempts', 'Last error', ''].filter((h) => h !== false);
  return el('section', { class: 'destination card', 'data-destination': destination },
    el('h2', {}, el('code', {}, destination), ' ', el('span', { class: 'muted small' }, `${jobs.length} job${jobs.length === 1 ? '' : 's'}`)),
    el('p', { class: 'last-error clip-lines' }, el('strong', {}, 'Last error: '), lastError || '–'),
    el('div', { class: 'table-wrap' }, el('table', {},
      el('thead', {}, el('tr', {}, ...headings.map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, rows))));
}

function replayResult(text, failed = false) {
  const node = $('#replay-result');
  node.textContent = text;
  node.classList.toggle('note-error', failed);
  show(node, true);
}

async function replayOne(jobId, destination) {
  const view = ctx;
  if (!(await confirmAction(`Redeliver job ${jobId} to ${destination}? It gets a fresh round of delivery attempts.`, 'Replay'))) return;
  if (view !== ctx) return;
  try {
    const answer = await viewApi(`/api/v1/jobs/${encodeURIComponent(jobId)}/redeliver`, { method: 'POST' });
    replayResult(`Job ${answer.job_id ?? jobId} requeued for delivery (round ${answer.delivery_round}).`);
    ctx?.deadPoller?.now();
  } catch (err) {
    if (isQuiet(err)) return;
    replayResult(`Replay of ${jobId} failed: ${err.message}`, true);
    reportError(err, 'Replay failed', 'replay');
  }
}

async function replayWindow(event) {
  event.preventDefault();
  const since = localInputToIso($('#replay-window-since').value);
  const until = localInputToIso($('#replay-window-until').value);
  if (!since) return replayResult('Choose when the window starts.', true);
  if (until && until <= since) return replayResult('The window must end after it starts.', true);
  const span = `from ${localTime(since)} until ${until ? localTime(until) : 'now'}`;
  const view = ctx;
  if (!(await confirmAction(`Redeliver every dead letter updated ${span}?`, 'Replay window'))) return;
  if (view !== ctx) return;
  try {
    const query = new URLSearchParams(until ? { since, until } : { since });
    const answer = await viewApi(`/api/v1/deliveries/redeliver?${query}`, { method: 'POST' });
    const requeued = answer.requeued ?? [];
    const ids = requeued.map((r) => (typeof r === 'string' ? r : r.job_id)).filter(Boolean);
    const shown = ids.slice(0, 20).join(', ') + (ids.length > 20 ? `, and ${ids.length - 20} more` : '');
    const skipped = answer.skipped?.length ?? 0;
    const more = skipped ? ` ${skipped} already redelivered.` : '';
    replayResult(`Requeued ${requeued.length} job${requeued.length === 1 ? '' : 's'}${ids.length ? `: ${shown}` : ''}.${more}`);
    ctx?.deadPoller?.now();
  } catch (err) {
    if (isQuiet(err)) return;
    replayResult(`Window replay failed: ${err.message}`, true);
    reportError(err, 'Window replay failed', 'replay');
  }
}

function wireDeadLetters() {
  // One listener for every row's button: rows are rebuilt on each refresh.
  $('#destinations').addEventListener('click', (event) => {
    const button = event.target.closest('button.replay');
    if (!button) return;
    const jobId = button.closest('tr').dataset.jobId;
    const destination = button.closest('section.destination').dataset.destination;
    replayOne(jobId, destination);
  });
  $('#replay-window-form').addEventListener('submit', replayWindow);
}

// ---------------------------------------------------------------------------------------------
// Boot
// ---------------------------------------------------------------------------------------------

function boot() {
  wireErrorBanner();
  wireVisibility();
  wireConfirm();
  wireSession();
  wireRouter();
  wireJobs();
  wireJob();
  wireDeadLetters();
  startSession();
}

boot();
