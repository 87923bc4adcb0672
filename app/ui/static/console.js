// clipguard console: plain JavaScript, no build step. Every call goes to the /v1 API through the
// same-origin bridge /ui/api/v1 (the session cookie becomes the bearer key there). Text from the
// server is only ever set with textContent, never parsed as HTML.
"use strict";

const API = "/ui/api";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1500;

// ------------------------------------------------------------------ helpers

function $(selector) {
  return document.querySelector(selector);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function pct(x) {
  return x === null || x === undefined ? "—" : `${(100 * x).toFixed(1)}%`;
}

function randomKey() {
  const raw = new Uint8Array(16);
  crypto.getRandomValues(raw); // randomUUID needs a secure context; a console on plain http has none
  return Array.from(raw, (b) => b.toString(16).padStart(2, "0")).join("");
}

function badge(text) {
  return el("span", { className: `state ${text}` }, text);
}

function shortId(id) {
  return id ? `${id.slice(0, 8)}…` : "";
}

// ------------------------------------------------------------------ errors (problem+json)

class ApiProblem extends Error {
  constructor(status, problem) {
    const lines = [problem.detail || problem.title || `HTTP ${status}`];
    for (const e of problem.errors || []) {
      const where = (e.loc || []).filter((p) => p !== "body").join(".");
      lines.push(`${where ? `${where}: ` : ""}${e.msg}`);
    }
    super(lines.length > 2 ? lines.join("\n") : lines[0]);
    this.status = status;
    this.type = problem.type || "about:blank";
  }
}

function problemFrom(status, text) {
  let problem;
  try {
    problem = JSON.parse(text);
  } catch (_) {
    problem = { title: `HTTP ${status}`, detail: text ? text.slice(0, 300) : undefined };
  }
  return new ApiProblem(status, typeof problem === "object" && problem ? problem : {});
}

function showError(err) {
  const box = $("#error");
  box.replaceChildren();
  if (err instanceof ApiProblem && err.status === 401) {
    box.append("Your session's API key is no longer accepted (revoked, or the session ended). ",
      el("a", { href: "/ui/login" }, "Sign in again"), ".");
  } else {
    box.append(err instanceof ApiProblem || err instanceof UserError ? err.message
      : `Could not reach the server (${err.message}). Check the connection and try again.`);
  }
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
}

function clearError() {
  const box = $("#error");
  box.hidden = true;
  box.replaceChildren();
}

class UserError extends Error {}

// ------------------------------------------------------------------ API calls

async function api(method, path, { json, form, headers } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json", ...(headers || {}) } };
  if (method !== "GET") init.headers["X-CSRF-Token"] = csrfToken();
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await fetch(API + path, init);
  const text = await response.text();
  if (!response.ok) throw problemFrom(response.status, text);
  return text ? JSON.parse(text) : null;
}

// Uploads go through XMLHttpRequest: fetch() reports no upload progress. The browser streams the
// File from disk, so its size does not matter to this page.
function upload(method, path, body, onProgress, contentType) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, API + path);
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.setRequestHeader("Accept", "application/json");
    if (contentType) xhr.setRequestHeader("Content-Type", contentType);
    xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : null));
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(problemFrom(xhr.status, xhr.responseText));
    });
    xhr.addEventListener("error", () => reject(new UserError("The connection broke during the upload. "
      + "Press the button again to retry from this step.")));
    xhr.addEventListener("abort", () => reject(new UserError("The upload was aborted.")));
    xhr.send(body);
  });
}

async function* pages(path, pageSize = 50) {
  let token = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api("GET", `${path}${sep}page_size=${pageSize}${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
    yield page.items;
    token = page.next_page_token;
  } while (token);
}

// ------------------------------------------------------------------ jobs page

function jobRow(job) {
  const active = !TERMINAL.has(job.state);
  const progress = el("progress", { max: 100, value: job.percent || 0, title: `${Math.round(job.percent || 0)}%` });
  const cancel = active && !job.cancel_requested
    ? el("button", { type: "button", className: "danger", "data-cancel": job.id, "data-label": "Cancel" },
      armed.has(job.id) ? "Confirm cancel" : "Cancel") : null;
  const lam = job.params && job.params.lam !== undefined && job.params.lam !== null ? job.params.lam : "default";
  return el("tr", { "data-job": job.id, "data-state": job.state },
    el("td", {}, el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, className: "mono" }, shortId(job.id))),
    el("td", {}, when(job.created_at)),
    el("td", {}, badge(job.state), job.cancel_requested && active ? " cancelling…" : ""),
    el("td", {}, job.stage || ""),
    el("td", {}, progress, ` ${Math.round(job.percent || 0)}%`),
    el("td", {}, (job.params && job.params.method) || "guard"),
    el("td", { className: "num" }, lam),
    el("td", {}, cancel));
}

const armed = new Set(); // jobs whose Cancel was clicked once: kept while the rows are redrawn by polling

function confirmThenCancel(button, jobId, after) {
  // Two clicks, no modal dialog: "Cancel", then "Confirm cancel" within a few seconds.
  if (!armed.has(jobId)) {
    armed.add(jobId);
    button.textContent = "Confirm cancel";
    setTimeout(() => {
      armed.delete(jobId);
      for (const b of document.querySelectorAll(`button[data-cancel="${CSS.escape(jobId)}"]`)) {
        b.textContent = b.dataset.label;
      }
    }, 4000);
    return;
  }
  armed.delete(jobId);
  button.disabled = true;
  api("POST", `/v1/jobs/${encodeURIComponent(jobId)}:cancel`).then(after, (err) => {
    button.disabled = false;
    showError(err);
  });
}

function listing({ table, path, row, empty, more }) {
  // A table filled page by page from a /v1 list route, with a button for the next page while there is one.
  const tbody = $(`${table} tbody`);
  let token = null;
  async function next() {
    const page = await api("GET", `${path}?page_size=50${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
    for (const item of page.items) tbody.append(row(item));
    token = page.next_page_token;
    $(empty).hidden = tbody.children.length > 0;
    $(more).hidden = !token;
  }
  $(more).addEventListener("click", () => next().catch(showError));
  return next();
}

function modelRow(m) {
  return el("tr", { "data-model": m.id },
    el("td", {}, m.name || ""),
    el("td", { className: "mono" }, shortId(m.id)),
    el("td", { className: "mono" }, m.arch),
    el("td", {}, badge(m.status), m.reject_reason ? el("div", { className: "hint bad" }, m.reject_reason) : null),
    el("td", { className: "num" }, bytes(m.size)),
    el("td", {}, when(m.created_at)));
}

function datasetRow(d) {
  return el("tr", { "data-dataset": d.id },
    el("td", {}, d.name || ""),
    el("td", { className: "mono" }, shortId(d.id)),
    el("td", {}, d.kind),
    el("td", { className: "num" }, bytes(d.size)),
    el("td", {}, when(d.created_at)));
}

async function jobsPage() {
  const tbody = $("#jobs tbody");
  const refresh = async () => {
    // The newest page again: rows update in place, new jobs appear on top; older pages stay as loaded.
    const page = await api("GET", "/v1/jobs?page_size=50");
    for (const job of page.items.slice().reverse()) {
      const fresh = jobRow(job);
      const old = tbody.querySelector(`tr[data-job="${CSS.escape(job.id)}"]`);
      if (old) old.replaceWith(fresh);
      else tbody.prepend(fresh);
    }
    $("#jobs-empty").hidden = tbody.children.length > 0;
    const active = Array.from(tbody.children).some((tr) => !TERMINAL.has(tr.dataset.state));
    if (active) setTimeout(() => refresh().catch(showError), POLL_MS);
  };
  tbody.addEventListener("click", (e) => {
    const button = e.target.closest("button[data-cancel]");
    if (button) confirmThenCancel(button, button.dataset.cancel, () => refresh().catch(showError));
  });
  await listing({ table: "#jobs", path: "/v1/jobs", row: jobRow, empty: "#jobs-empty", more: "#jobs-more" });
  await refresh();
  await listing({ table: "#models", path: "/v1/models", row: modelRow, empty: "#models-empty",
    more: "#models-more" });
  await listing({ table: "#datasets", path: "/v1/datasets", row: datasetRow, empty: "#datasets-empty",
    more: "#datasets-more" });
}

// ------------------------------------------------------------------ new job page

function value(id) {
  return $(id).value.trim();
}

function parseLam(text) {
  if (!text) return null;
  if (text === "auto") return "auto";
  const lam = Number(text);
  if (!Number.isFinite(lam)) throw new UserError(`λ must be a number or "auto", not "${text}".`);
  return lam;
}

function parseTriplet(name, text) {
  if (!text) return null;
  const parts = text.split(",").map((p) => Number(p.trim()));
  if (parts.length !== 3 || !parts.every(Number.isFinite)) {
    throw new UserError(`${name} must be three comma-separated numbers, e.g. 0.49,0.48,0.45.`);
  }
  return parts.join(",");
}

function step(text) {
  const steps = $("#steps");
  steps.hidden = false;
  const bar = el("progress", { max: 100, value: 0, hidden: true });
  const detail = el("span", { className: "muted" });
  const item = el("li", {}, text, bar, detail);
  steps.append(item);
  return {
    progress(loaded, total) {
      bar.hidden = false;
      if (total) { bar.max = total; bar.value = loaded; }
      detail.textContent = total ? `${bytes(loaded)} of ${bytes(total)}` : bytes(loaded);
    },
    note(text) { detail.textContent = text; },
    done(text) { item.className = "done"; bar.hidden = true; detail.textContent = text ? ` ${text}` : " done"; },
    failed() { item.className = "failed"; },
  };
}

async function newJobPage() {
  const form = $("#new-job");
  const limit = Number(document.body.dataset.maxUpload || 0);
  // What earlier tries already created on the server: a retry resumes after the step that failed.
  const made = { model: null, train: null, test: null, jobKey: randomKey() };

  for (const select of form.querySelectorAll("select[id$='-existing']")) {
    const sync = () => {
      for (const part of form.querySelectorAll(`[data-for="${select.id}"]`)) part.hidden = select.value !== "";
    };
    select.addEventListener("change", sync);
    sync();
  }
  form.addEventListener("change", (e) => {
    const what = e.target.dataset.reset;
    if (what && what !== "job") made[what] = null;
    made.jobKey = randomKey(); // another request body needs another Idempotency-Key
  });

  const existing = async (path, select, label) => {
    for await (const items of pages(path)) {
      for (const item of items) select.append(el("option", { value: item.id }, label(item)));
    }
  };
  await Promise.all([
    existing("/v1/models?status=ready", $("#model-existing"), (m) => `${m.name || m.id} (${m.arch})`),
    existing("/v1/datasets", $("#train-existing"), (d) => `${d.name || d.id} (${d.kind})`),
    existing("/v1/datasets", $("#test-existing"), (d) => `${d.name || d.id} (${d.kind})`),
  ]).catch(showError);

  const checkSize = (file) => {
    if (limit && file.size > limit) {
      throw new UserError(`${file.name} is ${bytes(file.size)}; this server takes uploads up to ${bytes(limit)}.`);
    }
  };

  async function model() {
    if ($("#model-existing").value) return { id: $("#model-existing").value, status: "ready" };
    const file = $("#weights").files[0];
    if (!made.model) {
      if (!file) throw new UserError("Choose a checkpoint file, or a model uploaded before.");
      checkSize(file);
      const fields = new FormData();
      fields.set("arch", value("#arch"));
      fields.set("num_classes", value("#num-classes") || "10");
      fields.set("name", file.name);
      const mean = parseTriplet("Mean", value("#mean"));
      const std = parseTriplet("Std", value("#std"));
      if (mean) fields.set("mean", mean);
      if (std) fields.set("std", std);
      made.model = await api("POST", "/v1/models", { form: fields });
    }
    if (made.model.status === "awaiting_upload") {
      // A PUT the connection dropped leaves the model waiting for content: the retry sends it again.
      const s = step(`Uploading ${file.name}`);
      made.model = await upload("PUT", `/v1/models/${made.model.id}/content`, file, s.progress,
        "application/octet-stream").catch((err) => { s.failed(); throw err; });
      s.done();
    }
    return made.model;
  }

  async function dataset(which, required) {
    const chosen = $(`#${which}-existing`).value;
    if (chosen) return { id: chosen };
    if (made[which]) return made[which];
    const file = $(`#${which}-file`).files[0];
    const ref = value(`#${which}-ref`);
    const split = value(`#${which}-split`);
    const fields = new FormData();
    if (split) fields.set("split", split);
    if (file && ref) throw new UserError(`Give the ${which === "train" ? "training" : "test"} data as a file or `
      + "as a server name or path, not both.");
    if (ref.startsWith("@")) {
      if (split) throw new UserError("A registered dataset already names its split; leave Split empty.");
      fields.set("registered", ref.slice(1));
    } else if (ref.startsWith("server:")) {
      fields.set("path", ref.slice("server:".length) + (split ? `#${split}` : ""));
      fields.delete("split");
    } else if (ref) {
      throw new UserError(`"${ref}": name a registered dataset as @name, or a server path as server:/path.`);
    } else if (file) {
      checkSize(file);
      fields.set("file", file);
      const s = step(`Uploading ${file.name}`);
      made[which] = await upload("POST", "/v1/datasets", fields, s.progress)
        .catch((err) => { s.failed(); throw err; });
      s.done();
      return made[which];
    } else if (required) {
      throw new UserError("Choose the training data: an archive to upload, @name, server:/path, "
        + "or a dataset added before.");
    } else {
      return null;
    }
    made[which] = await api("POST", "/v1/datasets", { form: fields });
    return made[which];
  }

  async function attack() {
    const file = $("#attack-file").files[0];
    if (file) {
      try {
        return JSON.parse(await file.text());
      } catch (_) {
        throw new UserError(`${file.name} is not JSON; choose the .attack.json that clipguard train wrote.`);
      }
    }
    return value("#attack") || null;
  }

  async function ready(m) {
    if (m.status === "ready") return m;
    const s = step("Checking the checkpoint (quarantine)");
    for (;;) {
      const current = await api("GET", `/v1/models/${m.id}`);
      if (current.status === "ready") { s.done(); return current; }
      if (current.status === "rejected") {
        s.failed();
        made.model = null; // a rejected upload cannot become ready: another file is needed
        throw new UserError(`The checkpoint was rejected: ${current.reject_reason}`);
      }
      await new Promise((r) => setTimeout(r, 500));
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearError();
    const button = $("#submit");
    button.disabled = true;
    $("#steps").replaceChildren();
    try {
      const lam = parseLam(value("#lam"));
      const boundsText = value("#bounds-samples");
      const spec = await attack();
      const m = await model();
      const train = await dataset("train", true);
      const test = await dataset("test", false);
      if (spec && !test) throw new UserError("An attack needs test data to measure its success on.");
      await ready(m);
      const body = { model_id: m.id, train_data_id: train.id, method: value("#method"), lam,
        granularity: value("#granularity") };
      if (boundsText) body.bounds_samples = Number(boundsText);
      if ($("#reactivation-check").checked) body.reactivation_check = true;
      if (test) body.eval = { test_data_id: test.id, attack: spec };
      const s = step("Starting the job");
      const job = await api("POST", "/v1/jobs", { json: body, headers: { "Idempotency-Key": made.jobKey } });
      s.done();
      window.location.assign(`/ui/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      showError(err);
      button.textContent = "Retry";
      button.disabled = false;
    }
  });
}

// ------------------------------------------------------------------ job page

function setText(id, text) {
  $(id).textContent = text === null || text === undefined || text === "" ? "—" : text;
}

function paramsText(params) {
  const p = params || {};
  const parts = [`method ${p.method || "guard"}`, `λ ${p.lam === null || p.lam === undefined ? "default" : p.lam}`,
    `granularity ${p.granularity || "channel"}`];
  if (p.bounds_samples !== undefined) parts.push(`bounds samples ${p.bounds_samples}`);
  if (p.reactivation_check) parts.push("reactivation check");
  if (typeof p.attack === "string") parts.push(`attack ${p.attack}`);
  else if (p.attack) parts.push(`attack ${p.attack.name || (p.attack.attack || {}).name || "object"} (.attack.json)`);
  return parts.join(", ");
}

function metricRows(summary) {
  const before = (summary && summary.before) || {};
  const after = (summary && summary.after) || {};
  const rows = [];
  for (const [key, label, higherIsBetter] of [["acc", "Clean accuracy (ACC)", true],
    ["asr", "Attack success rate (ASR)", false], ["ra", "Robust accuracy (RA)", true]]) {
    if (before[key] === undefined && after[key] === undefined) continue;
    let change = "—";
    let cls = "num";
    if (typeof before[key] === "number" && typeof after[key] === "number") {
      const pp = 100 * (after[key] - before[key]);
      change = `${pp >= 0 ? "+" : ""}${pp.toFixed(1)} pp`;
      if (Math.abs(pp) >= 0.05) cls += (pp > 0) === higherIsBetter ? " good" : " bad";
    }
    rows.push(el("tr", { "data-metric": key }, el("td", {}, label), el("td", { className: "num" }, pct(before[key])),
      el("td", { className: "num" }, pct(after[key])), el("td", { className: cls }, change)));
  }
  if (summary && typeof summary.lam === "number") {
    rows.push(el("tr", { "data-metric": "lam" }, el("td", {}, "λ used"), el("td", {}),
      el("td", { className: "num" }, summary.lam.toFixed(2)), el("td", {})));
  }
  return rows;
}

function className(report, index) {
  const classes = (((report.inputs || {}).data || {}).classes) || [];
  return classes[index] !== undefined ? `${index} (${classes[index]})` : String(index);
}

const VERDICT_WORDS = {
  backdoor_found: ["bad", "Backdoor found"],
  no_evidence: ["good", "No evidence of a backdoor"],
  inconclusive: ["unsure", "Inconclusive"],
};

function verdictNodes(report) {
  // The report's own verdict when it has one; otherwise what detection found, in words.
  const verdict = report.verdict;
  if (verdict && typeof verdict === "object" && VERDICT_WORDS[verdict.status]) {
    const [css, words] = VERDICT_WORDS[verdict.status];
    const nodes = [el("p", { className: "verdict" }, el("span", { className: `flag ${css}` }, words),
      `: ${verdict.summary || ""}`)];
    if (verdict.action) nodes.push(el("p", {}, `Done: ${verdict.action}.`));
    return nodes;
  }
  const nodes = [];
  const found = report.poison_detection;
  if (found && found.flagged) {
    const unlearned = (report.unlearning || {}).suspects;
    nodes.push(el("p", { className: "verdict" }, el("span", { className: "flag bad" }, "Poisoned training data found"),
      `: towards class ${className(report, found.target)} (z = ${Number(found.z || 0).toFixed(1)})`
      + (unlearned !== undefined ? `; ${unlearned} training samples relabelled and unlearned.` : ".")));
  } else if (found) {
    nodes.push(el("p", { className: "verdict" }, el("span", { className: "flag good" }, "No poisoned class found"),
      " in the training data: the model was clipped as given."));
  } else {
    nodes.push(el("p", { className: "verdict" }, "No poisoned-data detection in this run (method "
      + `${report.method || "paper"}): the model was clipped at μ+λσ.`));
  }
  const mmbd = report.detection;
  if (mmbd) {
    nodes.push(el("p", {}, `MM-BD (data-free): ${mmbd.flagged ? "backdoor suspected" : "no backdoor detected"}`
      + (mmbd.p_value !== undefined && mmbd.p_value !== null ? ` (p = ${Number(mmbd.p_value).toPrecision(3)})` : "")
      + (mmbd.target !== undefined && mmbd.target !== null ? `, most suspicious class ${className(report, mmbd.target)}` : "")
      + "."));
  }
  return nodes;
}

function reactivationNodes(report) {
  // What --reactivation-check saw: does a short fine-tune bring the backdoor back?
  const again = report.reactivation;
  if (!again || !again.after) return [];
  const asr = again.after.asr !== undefined && again.after.asr !== null ? `, ASR ${pct(again.after.asr)}` : "";
  return [el("p", { className: "reactivation" }, `Reactivation check: after a short fine-tune on `
    + `${again.tuned_on} training images without the suspects, ACC ${pct(again.after.acc)}${asr}; `
    + `it agrees with the purified model on ${pct(again.agreement)} of the ${again.agreement_on}.`)];
}

async function showResults(job, embed) {
  $("#results").hidden = false;
  const rows = metricRows(job.summary);
  $("#metrics tbody").replaceChildren(...rows);
  $("#metrics").hidden = rows.length === 0;
  $("#metrics-none").hidden = rows.length > 0;
  $("#artifacts tbody").replaceChildren(...job.artifacts.map((a) => el("tr", { "data-artifact": a.name },
    el("td", {}, el("a", { href: API + a.url, download: a.name }, a.name)),
    el("td", { className: "num" }, bytes(a.size)),
    el("td", { className: "mono", title: a.sha256 }, a.sha256.slice(0, 16)))));
  const html = job.artifacts.find((a) => a.name === "report.html");
  if (html) {
    $("#report-link").href = `${API}${html.url}?inline=1`;
    if (embed) {
      $("#report").src = `${API}${html.url}?inline=1`;
      $("#report").hidden = false;
    }
  } else {
    $("#report-link").hidden = true;
  }
  if (job.artifacts.some((a) => a.name === "report.json")) {
    try {
      const report = await api("GET", `/v1/jobs/${encodeURIComponent(job.id)}/artifacts/report.json`);
      $("#verdict").replaceChildren(...verdictNodes(report), ...reactivationNodes(report));
    } catch (err) {
      $("#verdict").textContent = `report.json could not be read: ${err.message}`;
    }
  } else {
    $("#verdict").textContent = "This job has no report.json.";
  }
}

async function jobPage() {
  const section = $("#job");
  const id = section.dataset.job;
  const embed = section.dataset.embedReport === "true";
  const cancel = $("#cancel");
  let shown = false;

  function render(job) {
    const state = $("#state");
    state.className = `state ${job.state}`;
    state.textContent = job.cancel_requested && !TERMINAL.has(job.state) ? `${job.state} (cancelling)` : job.state;
    section.dataset.state = job.state;
    $("#stage").textContent = job.state === "running" && job.stage ? job.stage : "";
    $("#percent").value = job.percent || 0;
    $("#percent-text").textContent = `${Math.round(job.percent || 0)}%`;
    const error = $("#job-error");
    error.hidden = !job.error;
    error.textContent = job.error || "";
    setText("#model-id", job.model_id);
    setText("#train-id", job.train_data_id);
    setText("#test-id", job.test_data_id);
    setText("#params", paramsText(job.params));
    setText("#created", when(job.created_at));
    setText("#started", when(job.started_at));
    setText("#finished", when(job.finished_at));
    setText("#attempts", String(job.attempts));
    cancel.hidden = TERMINAL.has(job.state) || job.cancel_requested;
  }

  async function poll() {
    let job;
    try {
      job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
    } catch (err) {
      showError(err);
      if (!(err instanceof ApiProblem) || err.status >= 500 || err.status === 429) setTimeout(poll, POLL_MS * 2);
      return;
    }
    clearError();
    render(job);
    if (job.state === "succeeded" && !shown) {
      shown = true;
      await showResults(job, embed);
    }
    if (!TERMINAL.has(job.state)) setTimeout(poll, POLL_MS);
  }

  cancel.addEventListener("click", () => confirmThenCancel(cancel, id, render));
  await poll();
}

// ------------------------------------------------------------------ start

const PAGES = { jobs: jobsPage, new: newJobPage, job: jobPage };

document.addEventListener("DOMContentLoaded", () => {
  const page = PAGES[document.body.dataset.page];
  if (page) page().catch(showError);
});
