// The dashboard: sign in with a management key, then keys, usage, billing and the account's data, all through
// the public Management API (api.js). The DOM is built with elements and text nodes only (the page's
// Content-Security-Policy enforces Trusted Types: no HTML strings). Times are UTC, like the API's buckets.

import { Api, ApiError, plans as loadPlans } from "./api.js";
import { drawStackedBars } from "./chart.js";
import {
  DAY, HOUR, METRICS, chartSeries, formatHour, formatInt, formatPeriod, formatTime, formatUsd, formatUsdExact, sumRows,
  toCsv,
} from "./usage.js";

const SESSION_KEY = "cheapest.management_key";
const BUDGET_WINDOWS = ["5h", "8h", "1d", "30d"];
const LAST_USED_DAYS = 31; // the longest range the API reports per hour

const $ = (id) => document.getElementById(id);

/** h("td", {class: "num"}, "3") - attributes by setAttribute, `on*` as listeners, children as text or nodes. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const state = {
  api: null,
  keys: [],
  names: new Map(), // key id -> "name (sk_…abcd)", kept for keys revoked during this visit
  lastUsed: new Map(), // key id -> start of the last hour with requests
  report: null,
  catalog: null,
  usageSeq: 0,
};

// --- messages -----------------------------------------------------------------------------------------------
function say(text) {
  $("alert").textContent = "";
  $("status").textContent = text;
}

function fail(text) {
  $("status").textContent = "";
  $("alert").textContent = text;
}

/** Run an action with `button` disabled; API errors become messages, a refused key ends the session. */
async function run(button, action) {
  if (button) button.disabled = true;
  try {
    await action();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.status === 401 && state.api) signOut("Signed out: the management key is no longer accepted.", true);
    else fail(err.message);
  } finally {
    if (button) button.disabled = false;
  }
}

// --- sign in / out --------------------------------------------------------------------------------------------
async function signIn(key, remember) {
  const api = new Api(key);
  const status = await api.get("/api/billing/status"); // proves the key before anything is shown
  state.api = api;
  if (remember) sessionStorage.setItem(SESSION_KEY, key);
  else sessionStorage.removeItem(SESSION_KEY);
  $("mk").value = "";
  $("signin").hidden = true;
  $("app").hidden = false;
  $("nav").hidden = false;
  say("Signed in.");
  setPresetRange();
  await loadCatalog();
  renderBilling(status);
  await refreshKeys();
  await refreshUsage();
  $("keys-h").focus();
}

function signOut(message, isError = false) {
  state.api = null;
  state.keys = [];
  state.names.clear();
  state.lastUsed.clear();
  state.report = null;
  sessionStorage.removeItem(SESSION_KEY);
  hideNewKey();
  for (const id of ["keys-table", "u-totals", "u-table", "plans-table", "prices-table"]) {
    $(id).tBodies[0].replaceChildren();
    $(id).tFoot?.remove();
  }
  for (const id of ["u-summary", "b-status", "u-chart", "u-legend", "u-chart-caption"]) $(id).replaceChildren();
  for (const name of Object.keys($("u-chart").dataset)) delete $("u-chart").dataset[name];
  $("app").hidden = true;
  $("nav").hidden = true;
  $("signin").hidden = false;
  if (isError) fail(message);
  else say(message);
  $("mk").focus();
}

// --- keys -----------------------------------------------------------------------------------------------------
function keyLabel(id) {
  return state.names.get(id) ?? `revoked key ${id}`;
}

/** A <time> element (ISO in `datetime`): "date time", which may wrap between the two but not inside either. */
function when(unix, text = formatTime(unix)) {
  const [date, clock] = text.split(" ");
  return h("time", { datetime: new Date(unix * 1000).toISOString(), class: "when" },
    h("span", {}, date), " ", h("span", {}, clock));
}

function keyState(key, now) {
  if (key.disabled) return "disabled";
  if (key.expires_at !== null && key.expires_at !== undefined && now >= key.expires_at) return "expired";
  return "active";
}

function limitsText(limits) {
  const parts = [];
  if (limits.rpm) parts.push(`${formatInt(limits.rpm)} req/min`);
  if (limits.tpm) parts.push(`${formatInt(limits.tpm)} tok/min`);
  return parts.length ? parts.join(", ") : "plan's";
}

function budgetText(limits) {
  if (limits.budget_usd === undefined || limits.budget_usd === null) return "plan's";
  return `${formatUsd(Math.round(limits.budget_usd * 1e6))} per ${limits.budget_window ?? "plan window"}`;
}

/** The key list, each key's last use (the latest hour with requests) and the billing status (it counts keys). */
async function refreshKeys() {
  const api = state.api;
  const to = Math.ceil(Date.now() / 1000 / HOUR) * HOUR;
  const [keys, recent, status] = await Promise.all([
    api.allKeys(),
    api.usage({ from: to - LAST_USED_DAYS * DAY, to, groupBy: "hour" }),
    api.get("/api/billing/status"),
  ]);
  if (state.catalog) renderBilling(status);
  state.keys = keys;
  for (const k of keys) state.names.set(k.id, `${k.name} (${k.hint})`);
  state.lastUsed.clear();
  for (const row of recent.data) {
    if (row.requests > 0 && row.start > (state.lastUsed.get(row.key_id) ?? -1)) {
      state.lastUsed.set(row.key_id, row.start);
    }
  }
  renderKeys();
  renderKeyFilter();
}

function renderKeys() {
  const now = Date.now() / 1000;
  const rows = state.keys.map((k) => {
    const st = keyState(k, now);
    const last = state.lastUsed.get(k.id);
    const cell = (label, ...content) => h("td", { "data-label": label }, ...content); // the label: phone layout
    return h("tr", { "data-key-id": k.id },
      h("th", { scope: "row" }, k.name),
      cell("Key", h("code", { class: "hint" }, k.hint)),
      cell("State", h("span", { class: `state state-${st}` }, st)),
      cell("Rate limits", limitsText(k.limits)),
      cell("Budget", budgetText(k.limits)),
      cell("Models", k.models ? k.models.join(", ") : "all"),
      cell("Created", when(k.created_at)),
      cell("Expires", k.expires_at ? when(k.expires_at) : "never"),
      cell("Last used", last !== undefined ? when(last, formatHour(last)) : `not in ${LAST_USED_DAYS} days`),
      cell("Actions", h("div", { class: "buttons" },
        h("button", { type: "button", class: "small secondary", "aria-label": `Edit key ${k.name}`,
                      onclick: () => openEdit(k) }, "Edit"),
        h("button", { type: "button", class: "small secondary",
                      "aria-label": `${k.disabled ? "Enable" : "Disable"} key ${k.name}`,
                      onclick: (e) => run(e.currentTarget, () => setDisabled(k, !k.disabled)) },
          k.disabled ? "Enable" : "Disable"),
        h("button", { type: "button", class: "small danger", "aria-label": `Revoke key ${k.name}`,
                      onclick: (e) => run(e.currentTarget, () => revoke(k)) }, "Revoke"))));
  });
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 10, class: "empty" }, "No keys yet: create one above.")));
  $("keys-table").tBodies[0].replaceChildren(...rows);
}

/** The key form's fields (create and edit share them); ids are prefixed so both forms can exist at once. */
function buildKeyForm(form, prefix, submitLabel, onCancel) {
  const id = (name) => `${prefix}-${name}`;
  const field = (name, label, input, help) => {
    if (help) input.setAttribute("aria-describedby", id(`${name}-help`));
    return h("div", { class: `field${name === "models" ? " wide" : ""}` }, h("label", { for: id(name) }, label), input,
      help ? h("p", { class: "help", id: id(`${name}-help`) }, help) : null);
  };
  const input = (name, attrs) => h("input", { id: id(name), name, ...attrs });
  const whole = { type: "number", inputmode: "numeric", min: 1, step: 1 };
  form.append(
    field("name", "Name", input("name", { type: "text", required: true, maxlength: 200 })),
    field("rpm", "Requests per minute", input("rpm", whole), "Empty: the plan's."),
    field("tpm", "Tokens per minute", input("tpm", whole), "Empty: the plan's."),
    field("budget", "Budget (USD)", input("budget", { type: "number", inputmode: "decimal", min: 0, step: "any" }),
          "Empty: no budget of its own."),
    field("window", "Budget window", h("select", { id: id("window"), name: "window" },
      h("option", { value: "" }, "the plan's"), BUDGET_WINDOWS.map((w) => h("option", { value: w }, w)))),
    field("expires", "Expires (UTC)", input("expires", { type: "datetime-local" }), "Empty: never."),
    field("models", "Models", input("models", { type: "text", list: id("model-list"), spellcheck: "false" }),
          "Comma-separated model ids; empty: every model."),
    h("datalist", { id: id("model-list"), "data-models": "" }), // filled from the price list once it is loaded
    h("div", { class: "buttons" },
      onCancel ? h("button", { type: "button", class: "secondary", onclick: onCancel }, "Cancel") : null,
      h("button", { type: "submit" }, submitLabel)),
  );
}

function toLocalInput(unix) {
  return new Date(unix * 1000).toISOString().slice(0, 16);
}

/** The form as a request body: {name, limits, expires_at, models}, `null` for what is left empty. */
function readKeyForm(prefix) {
  const v = (name) => $(`${prefix}-${name}`).value.trim();
  const limits = {};
  if (v("rpm")) limits.rpm = Number(v("rpm"));
  if (v("tpm")) limits.tpm = Number(v("tpm"));
  if (v("budget")) limits.budget_usd = Number(v("budget"));
  if (v("window")) limits.budget_window = v("window");
  const models = v("models").split(",").map((m) => m.trim()).filter(Boolean);
  return {
    name: v("name"),
    limits: Object.keys(limits).length ? limits : null,
    expires_at: v("expires") ? Math.floor(Date.parse(`${v("expires")}:00Z`) / 1000) : null,
    models: models.length ? models : null,
  };
}

function fillKeyForm(prefix, key) {
  const set = (name, value) => { $(`${prefix}-${name}`).value = value ?? ""; };
  set("name", key.name);
  set("rpm", key.limits.rpm);
  set("tpm", key.limits.tpm);
  set("budget", key.limits.budget_usd);
  set("window", key.limits.budget_window);
  set("expires", key.expires_at ? toLocalInput(key.expires_at) : "");
  set("models", key.models ? key.models.join(", ") : "");
}

async function createKey(form) {
  const body = readKeyForm("c");
  for (const k of ["limits", "expires_at", "models"]) if (body[k] === null) delete body[k];
  const created = await state.api.json("POST", "/api/keys", body);
  form.reset();
  $("create-details").open = false;
  showNewKey(created.key);
  say(`Key ${created.name} created. Copy its secret now: it is not shown again.`);
  await refreshKeys();
}

function showNewKey(secret) {
  const box = $("new-key");
  $("new-key-secret").value = secret;
  box.hidden = false;
  $("new-key-secret").focus();
  $("new-key-secret").select();
}

function hideNewKey() {
  $("new-key-secret").value = "";
  $("new-key").hidden = true;
}

async function copyNewKey() {
  const input = $("new-key-secret");
  try {
    await navigator.clipboard.writeText(input.value);
    say("Copied to the clipboard.");
  } catch {
    input.focus();
    input.select();
    say("Copying was not allowed here: the key is selected, press Ctrl+C (or ⌘C) to copy it.");
  }
}

let editing = null;

function openEdit(key) {
  editing = key;
  fillKeyForm("e", key);
  $("edit-h").textContent = `Edit key ${key.name} (${key.hint})`;
  $("edit-dialog").showModal();
}

async function saveEdit() {
  const key = editing;
  const body = readKeyForm("e"); // every field: what was cleared goes back to the plan's / never / every model
  const changed = await state.api.json("PATCH", `/api/keys/${encodeURIComponent(key.id)}`, body);
  $("edit-dialog").close();
  say(`Key ${changed.name} saved.`);
  await refreshKeys();
}

async function setDisabled(key, disabled) {
  await state.api.json("PATCH", `/api/keys/${encodeURIComponent(key.id)}`, { disabled });
  say(`Key ${key.name} ${disabled ? "disabled: its requests are refused until you enable it" : "enabled"}.`);
  await refreshKeys();
}

async function revoke(key) {
  const ok = await confirmAction(`Revoke the key ${key.name} (${key.hint})? Requests with it are refused at once, `
    + "on every server; this cannot be undone. Its usage stays in the reports.", "Revoke key");
  if (!ok) return;
  await state.api.json("DELETE", `/api/keys/${encodeURIComponent(key.id)}`);
  say(`Key ${key.name} revoked.`);
  await refreshKeys();
}

/** A modal yes/no; resolves true only on the confirm button. */
function confirmAction(text, okLabel) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    const done = (answer) => {
      dialog.removeEventListener("close", onClose);
      resolve(answer);
    };
    const onClose = () => done(dialog.returnValue === "ok");
    dialog.returnValue = "";
    dialog.addEventListener("close", onClose);
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

// --- usage ----------------------------------------------------------------------------------------------------
function dateInput(unix) {
  return new Date(unix * 1000).toISOString().slice(0, 10);
}

function setPresetRange() {
  const hours = $("u-range").value;
  if (hours === "custom") return;
  const to = Math.ceil(Date.now() / 1000 / HOUR) * HOUR;
  const from = to - Number(hours) * HOUR;
  $("u-from").value = dateInput(from);
  $("u-to").value = dateInput(to - 1);
  if (Number(hours) > LAST_USED_DAYS * 24) $("u-group").value = "day";
}

/** The chosen range in unix seconds: a preset is hour-exact, custom dates are whole UTC days. */
function chosenRange() {
  const preset = $("u-range").value;
  if (preset !== "custom") {
    const to = Math.ceil(Date.now() / 1000 / HOUR) * HOUR;
    return { from: to - Number(preset) * HOUR, to };
  }
  const from = Date.parse(`${$("u-from").value}T00:00:00Z`) / 1000;
  const to = Date.parse(`${$("u-to").value}T00:00:00Z`) / 1000 + DAY;
  return { from, to };
}

function renderKeyFilter() {
  const select = $("u-key");
  const current = select.value;
  select.replaceChildren(h("option", { value: "" }, "All keys"),
    ...state.keys.map((k) => h("option", { value: k.id }, `${k.name} (${k.hint})`)));
  if (state.keys.some((k) => k.id === current)) select.value = current;
}

async function refreshUsage() {
  const range = chosenRange();
  if (!Number.isFinite(range.from) || !Number.isFinite(range.to) || range.to <= range.from) {
    fail("Choose a start day on or before the end day.");
    return;
  }
  const seq = ++state.usageSeq;
  const report = await state.api.usage({ ...range, groupBy: $("u-group").value, keyId: $("u-key").value });
  if (seq !== state.usageSeq) return; // a newer request was made meanwhile
  state.report = report;
  const box = $("u-chart"); // the report's exact range, for scripts that compare the page with the API
  box.dataset.from = report.from;
  box.dataset.to = report.to;
  box.dataset.groupBy = report.group_by;
  box.dataset.keyId = $("u-key").value;
  renderUsage();
}

function renderUsage() {
  const report = state.report;
  if (!report) return;
  const total = sumRows(report.totals);
  $("u-summary").replaceChildren(
    ...[["Requests", formatInt(total.requests)], ["Prompt tokens", formatInt(total.prompt_tokens)],
      ["Completion tokens", formatInt(total.completion_tokens)], ["Cost", formatUsd(total.cost_micro)]]
      .map(([dt, dd]) => h("div", {}, h("dt", {}, dt), h("dd", { "data-total": dt }, dd))));
  renderChart();
  const numCells = (r) => [h("td", { class: "num" }, formatInt(r.requests)),
    h("td", { class: "num" }, formatInt(r.prompt_tokens)), h("td", { class: "num" }, formatInt(r.completion_tokens)),
    h("td", { class: "num" }, formatUsdExact(r.cost_micro))];
  const empty = (cols) => h("tr", {}, h("td", { colspan: cols, class: "empty" }, "No usage in this range."));
  const totals = report.totals.map((r) => h("tr", {}, h("td", {}, keyLabel(r.key_id)), h("td", {}, r.model),
                                               numCells(r)));
  $("u-totals").tBodies[0].replaceChildren(...(totals.length ? totals : [empty(6)]));
  $("u-totals").tFoot?.remove();
  if (totals.length > 1) {
    $("u-totals").append(h("tfoot", {}, h("tr", {}, h("td", { colspan: 2 }, "All"), numCells(total))));
  }
  const rows = [...report.data].sort((a, b) => b.start - a.start || keyLabel(a.key_id).localeCompare(keyLabel(b.key_id))
    || a.model.localeCompare(b.model));
  $("u-table").tBodies[0].replaceChildren(...(rows.length ? rows.map((r) => h("tr", {},
    h("td", {}, formatPeriod(r.start, report.group_by)), h("td", {}, keyLabel(r.key_id)), h("td", {}, r.model),
    numCells(r))) : [empty(7)]));
  $("u-table-caption").textContent = `Usage per ${report.group_by}, key and model, newest first`;
}

function renderChart() {
  const report = state.report;
  if (!report) return;
  const metric = $("u-metric").value;
  const split = $("u-split").value;
  const { times, series } = chartSeries(report, split, metric, keyLabel);
  const per = report.group_by;
  const span = `${formatTime(report.from)} to ${formatTime(report.to)} UTC`;
  const caption = `${METRICS[metric].label} per ${per}, by ${split}, ${span}`;
  const sum = series.reduce((a, s) => a + s.total, 0);
  $("u-chart-caption").textContent = caption;
  drawStackedBars($("u-chart"), {
    times, series, step: per === "hour" ? HOUR : DAY, integer: metric !== "cost", title: caption,
    description: `Stacked bars, one per ${per}; ${series.length} series; total ${METRICS[metric].format(sum)}. `
      + "The tables below list the same numbers.",
    formatValue: metric === "cost" ? (v) => formatUsd(v) : (v) => formatInt(v),
    formatTime: (t) => formatPeriod(t, per),
  });
  $("u-legend").replaceChildren(...series.map((s, i) => h("li", {},
    h("span", { class: `swatch s${i}`, "aria-hidden": "true" }), `${s.label}: ${METRICS[metric].format(s.total)}`)));
}

function downloadBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function downloadCsv() {
  const report = state.report;
  if (!report) return;
  const csv = toCsv(report, keyLabel);
  const name = `usage-${report.group_by}-${formatTime(report.from, false)}-${formatTime(report.to - 1, false)}.csv`;
  downloadBlob(new Blob([csv], { type: "text/csv" }), name);
  say(`Downloaded ${name} (${report.data.length} rows).`);
}

// --- billing ----------------------------------------------------------------------------------------------------
async function loadCatalog() {
  state.catalog = await loadPlans();
  for (const list of document.querySelectorAll("datalist[data-models]")) {
    list.replaceChildren(...state.catalog.prices.map((p) => h("option", { value: p.model })));
  }
}

function renderBilling(status) {
  const catalog = state.catalog;
  const items = [
    ["Plan", status.plan],
    ["Paid by", status.funding],
    ["Subscription", status.subscription_status + (status.period_end ? ` until ${formatTime(status.period_end)}` : "")],
    ["Credit balance", formatUsd(status.credit_balance_micro)],
    ["Keys", `${status.active_keys} active of ${status.keys}`],
  ];
  $("b-status").replaceChildren(...items.map(([dt, dd]) => h("div", {}, h("dt", {}, dt), h("dd", {}, dd))));
  $("plans-table").tBodies[0].replaceChildren(...catalog.data.map((p) => h("tr", {},
    h("th", { scope: "row" }, p.name), h("td", { class: "num" }, formatInt(p.rpm)),
    h("td", { class: "num" }, formatInt(p.tpm)),
    h("td", {}, p.budget_usd !== null && p.budget_usd !== undefined
      ? `${formatUsd(Math.round(p.budget_usd * 1e6))} per ${p.budget_window}` : "none"),
    h("td", { class: "num" }, formatUsd(Math.round(p.price_usd_month * 1e6))),
    h("td", {}, p.funding),
    h("td", {}, p.name === status.plan ? "your plan"
      : p.funding === "subscription"
        ? h("button", { type: "button", class: "small", "aria-label": `Subscribe to the ${p.name} plan`,
                        onclick: (e) => run(e.currentTarget, () => checkout(p.name)) }, "Subscribe")
        : ""))));
  $("prices-table").tBodies[0].replaceChildren(...catalog.prices.map((p) => h("tr", {},
    h("th", { scope: "row" }, p.model), h("td", { class: "num" }, formatUsd(Math.round(p.prompt_usd_per_mtok * 1e6))),
    h("td", { class: "num" }, formatUsd(Math.round(p.completion_usd_per_mtok * 1e6))))));
}

async function checkout(plan) {
  const session = await state.api.json("POST", "/api/billing/checkout", { plan });
  say("Opening the card payment page…");
  window.location.assign(session.url); // the payment provider's page, on the owner's click only
}

// --- the account's data ---------------------------------------------------------------------------------------
async function exportData() {
  const blob = await state.api.blob("/api/account/export");
  downloadBlob(blob, "account-export.json");
  say("Downloaded account-export.json.");
}

async function deleteAccount() {
  const deleted = await state.api.json("DELETE", "/api/account");
  $("delete-dialog").close();
  signOut(`Account deleted. Every key stopped working; its data is purged by ${formatTime(deleted.purge_by)} UTC.`);
}

// --- wiring -----------------------------------------------------------------------------------------------------
function wire() {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("mk").value.trim();
    if (!key.startsWith("mk_")) {
      fail("A management key starts with mk_ (inference keys, sk_, cannot sign in here).");
      $("mk").focus();
      return;
    }
    run(e.submitter, () => signIn(key, $("remember").checked));
  });
  $("sign-out").addEventListener("click", () => signOut("Signed out. The key is forgotten by this page."));

  buildKeyForm($("create-form"), "c", "Create key");
  $("create-form").addEventListener("submit", (e) => {
    e.preventDefault();
    run(e.submitter, () => createKey(e.currentTarget));
  });
  $("copy-key").addEventListener("click", copyNewKey);
  $("dismiss-key").addEventListener("click", () => {
    hideNewKey();
    say("The new key's secret is gone from this page.");
    $("keys-h").focus();
  });

  buildKeyForm($("edit-form"), "e", "Save", () => $("edit-dialog").close());
  $("edit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    run(e.submitter, saveEdit);
  });

  $("confirm-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("confirm-dialog").close("ok");
  });
  $("confirm-cancel").addEventListener("click", () => $("confirm-dialog").close("cancel"));

  const usage = $("usage-form");
  usage.addEventListener("submit", (e) => { // Show: fresh numbers everywhere, the keys' last use included
    e.preventDefault();
    run(e.submitter, () => Promise.all([refreshUsage(), refreshKeys()]));
  });
  $("u-range").addEventListener("change", () => {
    setPresetRange();
    run(null, refreshUsage);
  });
  for (const id of ["u-from", "u-to"]) {
    $(id).addEventListener("change", () => {
      $("u-range").value = "custom";
    });
  }
  for (const id of ["u-group", "u-key"]) $(id).addEventListener("change", () => run(null, refreshUsage));
  for (const id of ["u-split", "u-metric"]) $(id).addEventListener("change", renderChart);
  $("u-csv").addEventListener("click", downloadCsv);
  let width = 0;
  new ResizeObserver(([entry]) => {
    const w = Math.round(entry.contentRect.width);
    if (w !== width && state.report) requestAnimationFrame(renderChart);
    width = w;
  }).observe($("u-chart"));

  $("export").addEventListener("click", (e) => run(e.currentTarget, exportData));
  const confirmInput = $("delete-confirm");
  $("delete-open").addEventListener("click", () => {
    confirmInput.value = "";
    $("delete-ok").disabled = true;
    $("delete-dialog").showModal();
  });
  confirmInput.addEventListener("input", () => { $("delete-ok").disabled = confirmInput.value.trim() !== "DELETE"; });
  $("delete-cancel").addEventListener("click", () => $("delete-dialog").close());
  $("delete-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (confirmInput.value.trim() === "DELETE") run(e.submitter, deleteAccount);
  });

  for (const id of ["keys-h", "usage-h", "billing-h", "account-h"]) $(id).setAttribute("tabindex", "-1");
}

wire();
const remembered = sessionStorage.getItem(SESSION_KEY);
if (remembered) {
  $("remember").checked = true;
  run(null, () => signIn(remembered, true)).then(() => {
    if (!state.api) sessionStorage.removeItem(SESSION_KEY);
  });
} else {
  $("mk").focus();
}
