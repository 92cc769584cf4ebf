// stune web: forms generated from /api/schema (the option registry), the run's events over SSE.
// Plain JavaScript, no build step.

const $ = (selector, root = document) => root.querySelector(selector);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
};

async function api(path, options = {}) {
  const init = { ...options, headers: { ...(options.headers || {}) } };
  if (init.body !== undefined && typeof init.body !== "string") {
    init.body = JSON.stringify(init.body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.error) || `${response.status} ${response.statusText}`);
    error.data = data || {};
    throw error;
  }
  return data;
}

const state = { schema: null, fields: new Map(), config: null, datasets: [], run: null, runId: null };

function setStatus(node, text, ok) {
  node.textContent = text;
  node.className = "status " + (ok === undefined ? "" : ok ? "ok" : "bad");
}

// ---- tabs ------------------------------------------------------------------------------------------
function showTab() {
  const tab = (location.hash || "#configure").slice(1);
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== `page-${tab}`;
  for (const link of document.querySelectorAll("#tabs a")) link.classList.toggle("active", link.dataset.tab === tab);
  if (tab === "outputs") loadRuns();
  if (tab === "compare") loadCompare();
  if (tab === "run") refreshRunView();
}

// ---- option fields -----------------------------------------------------------------------------------
function shown(value, kind) {
  if (value === undefined || value === null) return "";
  if (kind === "list" || kind === "json" || typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function typed(text, field) {
  const trimmed = text.trim();
  if (field.kind === "choice") {
    const match = (field.choices || []).find((c) => String(c) === text);
    return match === undefined ? text : match;
  }
  if (field.kind === "bool") return text === "true";
  if (field.kind === "int" && /^-?\d+$/.test(trimmed)) return parseInt(trimmed, 10);
  if (field.kind === "float" && trimmed !== "" && !isNaN(Number(trimmed))) return Number(trimmed);
  if (field.kind === "list") {
    if (trimmed.startsWith("[")) { try { return JSON.parse(trimmed); } catch (e) { return text; } }
    return trimmed.split(",").map((s) => s.trim()).filter(Boolean);
  }
  if (field.kind === "json") { try { return JSON.parse(trimmed); } catch (e) { return text; } }
  return text;
}

function defaultText(field) {
  if (field.default === null || field.default === undefined) return "unset";
  return shown(field.default, field.kind);
}

// One option: its input, help, default and whether the file sets it.
function optionField(field, value, inFile, onChange) {
  let input;
  const initial = inFile ? shown(value, field.kind) : "";
  if (field.kind === "bool" || field.kind === "choice") {
    input = el("select", { name: field.key });
    input.append(el("option", { value: "", text: `— default: ${defaultText(field)}` }));
    const options = field.kind === "bool" ? ["true", "false"] : (field.choices || []).map(String);
    for (const option of options) input.append(el("option", { value: option, text: option }));
    if (inFile && !options.includes(initial) && initial !== "") input.append(el("option", { value: initial, text: initial }));
    input.value = field.kind === "bool" && inFile ? String(String(value).toLowerCase() === "true") : initial;
  } else {
    input = el("input", { name: field.key, placeholder: `default: ${defaultText(field)}`, autocomplete: "off" });
    input.value = initial;
    if (field.suggestions) input.setAttribute("list", `list-${field.key}`);
  }
  const start = input.value;
  const limits = field.limits ? Object.entries(field.limits).map(([k, v]) => `${{ ge: "≥", gt: ">", le: "≤", lt: "<" }[k]} ${v}`).join(", ") : "";
  const unset = el("button", { class: "unset", type: "button", title: "remove this key from the file (back to the default)", text: "remove" });
  const node = el(
    "div",
    { class: "field", "data-key": field.key, "data-search": `${field.key} ${field.help}`.toLowerCase() },
    el("div", { class: "name" }, field.key, el("span", { class: "badge" + (inFile ? " set" : ""), text: inFile ? "in file" : field.plugin }), inFile ? unset : null),
    input,
    field.suggestions ? el("datalist", { id: `list-${field.key}` }, field.suggestions.map((s) => el("option", { value: s }))) : null,
    el("div", { class: "help", text: `${field.help}${limits ? ` (${limits})` : ""} — ${field.type}` }),
    el("div", { class: "problem" }),
  );
  const entry = {
    field, node, input, inFile, removed: false,
    changed: () => input.value !== start,
    value: () => typed(input.value, field),
  };
  input.addEventListener("input", () => { node.classList.toggle("changed", entry.changed()); onChange && onChange(entry); });
  input.addEventListener("change", () => { node.classList.toggle("changed", entry.changed()); onChange && onChange(entry); });
  unset.addEventListener("click", () => {
    entry.removed = !entry.removed;
    unset.textContent = entry.removed ? "keep" : "remove";
    node.classList.toggle("changed", entry.removed);
    input.disabled = entry.removed;
  });
  return entry;
}

// ---- configure -------------------------------------------------------------------------------------
const FIRST = ["model_family", "model_flavour", "pretrained_model_name_or_path"];

function familyOf(name) { return state.schema.families.find((f) => f.name === name); }

async function loadConfig() {
  const config = await api("/api/config");
  state.config = config;
  state.fields.clear();
  $("#config-path").textContent = config.path;
  if (config.error) setStatus($("#config-status"), config.error, false);
  const values = config.values || {};
  const all = new Map(state.schema.groups.flatMap((g) => g.options.map((o) => [o.key, o])));
  const modelBox = $("#model-fields");
  modelBox.replaceChildren();
  for (const key of FIRST) {
    const field = { ...all.get(key) };
    if (key === "model_flavour") {
      const family = familyOf(values.model_family) || (state.schema.families.length === 1 ? state.schema.families[0] : null);
      if (family && Object.keys(family.flavours).length) {
        field.kind = "choice";
        field.choices = Object.keys(family.flavours);
        field.default = family.default_flavour;
        field.help = `${family.name} flavours: ` + Object.entries(family.flavours).map(([k, v]) => `${k} = ${v}`).join(", ") + `. Default ${family.default_flavour}.`;
      }
    }
    if (key === "model_family") {
      field.help += " Installed: " + state.schema.families.map((f) => `${f.name} (${f.description})`).join("; ");
    }
    const entry = optionField(field, values[key], key in values, key === "model_family" ? onFamilyChange : null);
    state.fields.set(key, entry);
    modelBox.append(entry.node);
  }
  const groups = $("#groups");
  groups.replaceChildren();
  for (const group of state.schema.groups) {
    const box = el("div", { class: "fields" });
    let set = 0;
    for (const field of group.options) {
      if (FIRST.includes(field.key)) continue;
      const entry = optionField(field, values[field.key], field.key in values);
      set += field.key in values ? 1 : 0;
      state.fields.set(field.key, entry);
      box.append(entry.node);
    }
    groups.append(el("details", { class: "group", "data-group": group.id, open: group.id === "model" || group.id === "adapter" },
      el("summary", {}, group.title, el("span", { class: "muted", text: `${group.help} ${group.options.length} options${set ? `, ${set} in the file` : ""}` })),
      box));
  }
  const unknown = Object.entries(config.unknown || {});
  $("#unknown-card").hidden = unknown.length === 0;
  $("#unknown-keys").replaceChildren(
    el("tr", {}, el("th", { text: "key" }), el("th", { text: "value" }), el("th", { text: "why st-train refuses it" })),
    ...unknown.map(([key, why]) => el("tr", {}, el("td", {}, el("code", { text: key })), el("td", { text: JSON.stringify(config.written[key]) }), el("td", { text: why }))),
  );
  if (config.problem) markProblem(config.problem.key, config.problem.message);
  else if (config.warning) setStatus($("#config-status"), `st-train would stop here: ${config.warning.message}`, false);
  applyFilter();
}

function onFamilyChange() {
  // The flavour list follows the family: rebuild the model card from the current choices.
  const family = familyOf(state.fields.get("model_family").value());
  const flavour = state.fields.get("model_flavour");
  if (!family) return;
  const select = flavour.input;
  const keep = select.value;
  if (select.tagName === "SELECT") {
    select.replaceChildren(el("option", { value: "", text: `— default: ${family.default_flavour || "unset"}` }),
      ...Object.keys(family.flavours).map((k) => el("option", { value: k, text: k })));
    select.value = Object.keys(family.flavours).includes(keep) ? keep : "";
  }
  flavour.field.choices = Object.keys(family.flavours);
  $(".help", flavour.node).textContent = `${family.name} flavours: ` + Object.entries(family.flavours).map(([k, v]) => `${k} = ${v}`).join(", ");
}

function applyFilter() {
  const text = $("#option-filter").value.trim().toLowerCase();
  const onlySet = $("#only-set").checked;
  for (const details of document.querySelectorAll("#groups details.group")) {
    let visible = 0;
    for (const node of details.querySelectorAll(".field")) {
      const entry = state.fields.get(node.dataset.key);
      const show = (!text || node.dataset.search.includes(text)) && (!onlySet || entry.inFile || entry.changed());
      node.hidden = !show;
      visible += show ? 1 : 0;
    }
    details.hidden = visible === 0;
    if (text || onlySet) details.open = visible > 0;
  }
}

function markProblem(key, message) {
  for (const node of document.querySelectorAll(".field.error")) { node.classList.remove("error"); $(".problem", node).textContent = ""; }
  const entry = key && state.fields.get(key);
  if (entry) {
    entry.node.classList.add("error");
    $(".problem", entry.node).textContent = message;
    const group = entry.node.closest("details");
    if (group) group.open = true;
  }
}

async function saveConfig() {
  const changes = {};
  const removed = [];
  for (const [key, entry] of state.fields) {
    if (entry.removed) removed.push(key);
    else if (entry.changed()) {
      if (entry.input.value.trim() === "") { if (entry.inFile) removed.push(key); }
      else changes[key] = entry.value();
    }
  }
  const status = $("#config-status");
  if (!Object.keys(changes).length && !removed.length) { setStatus(status, "Nothing changed.", true); return; }
  try {
    await api("/api/config", { method: "PUT", body: { set: changes, unset: removed } });
    await loadConfig();
    await loadLycoris();
    const n = Object.keys(changes).length + removed.length;
    const warning = state.config.warning ? ` st-train would stop here: ${state.config.warning.message}` : "";
    setStatus(status, `Saved ${state.config.path}: ${n} key${n > 1 ? "s" : ""} changed.${warning}`, !warning);
  } catch (error) {
    markProblem(error.data.key, error.message);
    setStatus(status, error.message, false);
  }
}

// ---- LyCORIS -----------------------------------------------------------------------------------
async function loadLycoris() {
  const data = await api("/api/lycoris");
  $("#lycoris-path").textContent = data.path;
  const presets = $("#lycoris-preset");
  presets.replaceChildren(el("option", { value: "", text: "—" }), ...Object.entries(state.schema.lycoris_presets).map(([k, p]) => el("option", { value: k, text: `${k}: ${p.title}` })));
  $("#lycoris-json").value = data.settings ? JSON.stringify(data.settings, null, 2) : "";
  if (data.error) setStatus($("#lycoris-status"), data.error, false);
  else setStatus($("#lycoris-status"), data.exists ? "" : "no file yet", undefined);
  api("/api/lycoris/algorithms").then((vocab) => {
    const algo = $("#lycoris-algo");
    const current = (lycorisJson() || {}).algo || "";
    algo.replaceChildren(el("option", { value: "", text: "—" }), ...vocab.algorithms.map((a) => el("option", { value: a, text: a })));
    algo.value = current;
  }).catch(() => {});
}

function lycorisJson() {
  try { return JSON.parse($("#lycoris-json").value || "{}"); } catch (e) { return null; }
}

// ---- datasets ----------------------------------------------------------------------------------
function datasetFieldMap() { return new Map(state.schema.dataset.options.map((o) => [o.key, o])); }
const bare = (key) => key.replace(/^-+/, "");

async function loadDatasets() {
  const data = await api("/api/datasets");
  $("#datasets-path").textContent = data.path;
  state.datasets = data.datasets || [];
  renderDatasets(data.problems || []);
  if (data.error) setStatus($("#datasets-status"), data.error, false);
}

function renderDatasets(problems) {
  const list = $("#dataset-list");
  list.replaceChildren();
  const known = datasetFieldMap();
  state.datasets.forEach((entry, index) => {
    const present = Object.keys(entry);
    const main = el("div", { class: "fields" });
    const more = el("div", { class: "fields" });
    for (const [key, field] of known) {
      const written = present.find((k) => bare(k) === key);
      const node = optionField(field, written ? entry[written] : undefined, Boolean(written), null);
      const update = () => {
        const text = node.input.value;
        const name = written || key;
        if (text.trim() === "" || node.removed) delete entry[name];
        else entry[name] = typed(text, field);
      };
      node.input.addEventListener("change", update);
      node.input.addEventListener("input", update);
      $(".unset", node.node) && $(".unset", node.node).addEventListener("click", update);
      (written ? main : more).append(node.node);
    }
    const unknown = present.filter((k) => !known.has(bare(k)));
    const problem = problems.find((p) => p.index === index);
    list.append(el("div", { class: "dataset", "data-index": index },
      el("div", { class: "head" }, el("strong", { text: entry.id || `#${index}` }), el("span", { class: "muted", text: entry.dataset_type || "image" }),
        el("button", { type: "button", text: "remove", onclick: () => { state.datasets.splice(index, 1); renderDatasets([]); } })),
      problem ? el("div", { class: "problem status bad", text: problem.message }) : null,
      main,
      unknown.length ? el("div", { class: "muted", text: "Kept as written (st-train does not know them): " + unknown.map((k) => `${k} = ${JSON.stringify(entry[k])}`).join(", ") }) : null,
      el("details", {}, el("summary", { text: `more dataset keys (${more.childElementCount})` }), more)));
  });
}

async function saveDatasets() {
  const status = $("#datasets-status");
  try {
    const data = await api("/api/datasets", { method: "PUT", body: { datasets: state.datasets } });
    state.datasets = data.datasets;
    renderDatasets(data.problems || []);
    setStatus(status, `Saved ${data.path}.`, true);
    return true;
  } catch (error) {
    setStatus(status, error.message, false);
    return false;
  }
}

async function checkDatasets() {
  const status = $("#datasets-status");
  setStatus(status, "Checking…");
  const result = await api("/api/check", { method: "POST", body: {} });
  const box = $("#check-report");
  $("#check-card").hidden = false;
  box.replaceChildren();
  if (result.error) box.append(el("p", { class: "status bad", text: result.error }));
  for (const d of (result.report && result.report.datasets) || []) {
    const skipped = Object.entries(d.skipped).map(([why, n]) => `${n} ${why}`).join(", ") || "none";
    const buckets = Object.entries(d.buckets).map(([k, n]) => `${k}: ${n}`).join(", ") || "none";
    const dropped = Object.entries(d.dropped_buckets).map(([k, why]) => `${k} (${why})`).join(", ");
    box.append(...[el("h3", { text: `${d.id} — ${d.folder}` }), el("table", { class: "facts" },
      el("tr", {}, el("th", { text: "files found" }), el("td", { text: d.files_found })),
      el("tr", {}, el("th", { text: "used" }), el("td", { text: d.used })),
      el("tr", {}, el("th", { text: "skipped" }), el("td", { text: skipped })),
      el("tr", {}, el("th", { text: "buckets" }), el("td", { text: buckets })),
      dropped ? el("tr", {}, el("th", { text: "dropped buckets" }), el("td", { text: dropped })) : null,
      el("tr", {}, el("th", { text: "samples per epoch" }), el("td", { text: `${d.samples_per_epoch} (repeats ${d.repeats}, batch ${d.batch_size})` })),
      el("tr", {}, el("th", { text: "captions" }), el("td", { text: d.example_captions.join(" | ") }))),
      d.skipped_files.length ? el("details", {}, el("summary", { text: `${d.skipped_files.length} skipped files` }),
        el("ul", {}, d.skipped_files.map((s) => el("li", { text: `${s.path}: ${s.reason}${s.detail ? ` (${s.detail})` : ""}` })))) : null].filter(Boolean));
  }
  setStatus(status, result.ok ? "st-train check: ready to train." : "st-train check found a problem.", result.ok);
}

// ---- devices and the run -------------------------------------------------------------------------
let devices = { gpus: [], modes: [] };

async function loadDevices() {
  devices = await api("/api/devices");
  const modes = $("#device-modes");
  const hasGpu = devices.gpus.length > 0;
  const labels = { auto: "Auto: every GPU", manual: "Manual: chosen GPUs", disabled: "Disabled: one GPU", cpu: "CPU" };
  modes.replaceChildren(...devices.modes.filter((m) => hasGpu || m === "cpu").map((mode) =>
    el("label", {}, el("input", { type: "radio", name: "device-mode", value: mode, checked: mode === (hasGpu ? "auto" : "cpu"), onchange: renderDeviceList }), " ", labels[mode])));
  renderDeviceList();
}

function deviceMode() { const c = document.querySelector("input[name=device-mode]:checked"); return c ? c.value : "cpu"; }

function renderDeviceList() {
  const mode = deviceMode();
  const list = $("#device-list");
  list.replaceChildren();
  if (!devices.gpus.length) list.append(el("p", { class: "muted", text: "No GPU detected: training runs on the CPU." }));
  for (const gpu of devices.gpus) {
    const label = `GPU ${gpu.index}: ${gpu.name}${gpu.memory_mb ? ` (${Math.round(gpu.memory_mb / 1024)} GiB)` : ""}`;
    if (mode === "manual") list.append(el("label", {}, el("input", { type: "checkbox", name: "gpu", value: gpu.index, checked: true }), " ", label));
    else if (mode === "disabled") list.append(el("label", {}, el("input", { type: "radio", name: "gpu", value: gpu.index, checked: gpu.index === devices.gpus[0].index }), " ", label));
    else if (mode === "auto") list.append(el("div", { text: label }));
  }
  $("#process-count").hidden = !(mode === "manual" || mode === "cpu");
}

function progressFacts(p) {
  const rows = [
    ["step", p ? `${p.step} / ${p.max_steps ?? "?"}` : "—"],
    ["loss", p && p.loss != null ? p.loss.toFixed(5) : "—"],
    ["lr", p && p.lr != null ? p.lr.toExponential(2) : "—"],
    ["it/s", p && p.it_s ? p.it_s.toFixed(2) : "—"],
    ["ETA", p && p.eta_seconds != null ? duration(p.eta_seconds) : "—"],
    ["epoch", p && p.epoch != null ? p.epoch : "—"],
  ];
  $("#progress-facts").replaceChildren(el("tr", {}, rows.map(([k]) => el("th", { text: k }))), el("tr", {}, rows.map(([, v]) => el("td", { "data-fact": "", text: v }))));
  if (p && p.max_steps) $("#progress-bar").style.width = `${(100 * p.step) / p.max_steps}%`;
}

function duration(seconds) {
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min` : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function setRun(summary, id) {
  state.run = summary;
  if (id || (summary && summary.id)) state.runId = id || summary.id;
  const pill = $("#run-pill");
  const label = summary ? summary.state : "idle";
  pill.textContent = summary && summary.state === "running" && summary.max_steps ? `running ${summary.step}/${summary.max_steps}` : label;
  pill.className = `pill ${label}`;
  const active = summary && ["starting", "running", "stopping"].includes(summary.state);
  $("#run-start").disabled = Boolean(active);
  $("#run-stop").disabled = !active;
  $("#run-kill").hidden = !(summary && summary.state === "stopping");
  if (summary) {
    $("#run-command").textContent = (Object.entries(summary.env || {}).map(([k, v]) => `${k}=${v} `).join("")) + "st-train " + summary.command.slice(4).join(" ");
    const error = summary.error ? `: ${summary.error}` : "";
    setStatus($("#run-status"), `${summary.state}${summary.returncode != null ? ` (exit ${summary.returncode})` : ""}${error}`, summary.state === "failed" ? false : undefined);
  }
}

let chartTimer = null;
function refreshCharts(soon = false) {
  if (chartTimer) return;
  chartTimer = setTimeout(async () => {
    chartTimer = null;
    if (!state.runId) return;
    try {
      const data = await api(`/api/runs/charts?run=${encodeURIComponent(state.runId)}`);
      $("#run-charts").innerHTML = data.charts.join("");
    } catch (e) { /* the run folder appears with the first step */ }
  }, soon ? 50 : 1500);
}

function fileUrl(run, path, download = false) {
  return `/api/runs/file?run=${encodeURIComponent(run)}&path=${encodeURIComponent(path)}${download ? "&download=1" : ""}`;
}

function addImage(name, step, prepend = true) {
  const box = $("#run-images");
  if (box.querySelector(`[data-name="${CSS.escape(name)}"]`)) return;
  const figure = el("figure", { "data-name": name }, el("img", { src: fileUrl(state.runId, `validation_images/${name}`), alt: name }),
    el("figcaption", { text: step == null ? name.replace(/\.[a-z]+$/, "") : `step ${step}` }));
  prepend ? box.prepend(figure) : box.append(figure);
}

async function refreshRunView() {
  const data = await api("/api/run");
  setRun(data.run, data.id);
  if (data.id) {
    refreshCharts(true);
    try {
      const details = await api(`/api/runs/details?run=${encodeURIComponent(data.id)}`);
      for (const image of details.images.slice(-12)) addImage(image.file.split("/").pop(), image.step < 0 ? null : image.step, true);
    } catch (e) { /* not on disk yet */ }
  }
}

function appendLog(line) {
  const log = $("#run-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent += line + "\n";
  if (log.textContent.length > 200000) log.textContent = log.textContent.slice(-150000);
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function connectEvents() {
  const source = new EventSource("/api/events");
  source.addEventListener("status", (event) => {
    const summary = JSON.parse(event.data);
    state.runId = summary.id;
    if (summary.state === "starting" && (!state.run || state.run.started !== summary.started)) {
      $("#run-log").textContent = "";
      $("#run-images").replaceChildren();
      $("#run-charts").replaceChildren();
      progressFacts(null);
      $("#progress-bar").style.width = "0";
    }
    api("/api/run").then((data) => setRun(data.run, data.id));
    setRun(summary);
    if (["finished", "stopped", "killed", "failed", "ended"].includes(summary.state)) refreshCharts(true);
  });
  source.addEventListener("progress", (event) => {
    const p = JSON.parse(event.data);
    progressFacts(p);
    if (state.run) { state.run.step = p.step; state.run.max_steps = p.max_steps; setRun(state.run); }
    refreshCharts();
  });
  source.addEventListener("eval", () => refreshCharts());
  source.addEventListener("log", (event) => appendLog(JSON.parse(event.data).line));
  source.addEventListener("image", (event) => { const i = JSON.parse(event.data); addImage(i.name, i.step); });
  source.addEventListener("checkpoint", (event) => appendLog(`[stune web] checkpoint saved: ${JSON.parse(event.data).name}`));
}

async function startRun() {
  const mode = deviceMode();
  const gpus = [...document.querySelectorAll("input[name=gpu]:checked")].map((i) => Number(i.value));
  const processes = $("#processes").value;
  const body = {
    devices: { mode, gpus, processes: processes ? Number(processes) : null },
    resume: $("#run-resume").value || null,
    output_dir: $("#run-output").value.trim() || null,
    extra: $("#run-extra").value.trim(),
  };
  try {
    const data = await api("/api/run", { method: "POST", body });
    state.runId = data.id;
    setRun(data.run, data.id);
    setStatus($("#run-status"), `starting on ${data.devices.description}…`);
  } catch (error) {
    setStatus($("#run-status"), error.message, false);
  }
}

async function stopRun(force) {
  try {
    const data = await api("/api/run/stop", { method: "POST", body: { force } });
    setRun(data.run);
  } catch (error) {
    setStatus($("#run-status"), error.message, false);
  }
}

// ---- outputs and comparison ---------------------------------------------------------------------
async function loadRuns() {
  const data = await api("/api/runs");
  const select = $("#outputs-run");
  const keep = select.value;
  select.replaceChildren(...data.runs.map((r) => el("option", { value: r.id, text: `${r.id} (${r.steps} steps${r.active ? ", training" : ""})` })));
  if (!data.runs.length) { $("#outputs-body").replaceChildren(el("p", { class: "muted", text: "No run in this project yet." })); return; }
  select.value = data.runs.some((r) => r.id === keep) ? keep : (data.runs.find((r) => r.id === data.configured) || data.runs[0]).id;
  await showOutputs();
}

function size(bytes) {
  return bytes > 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1024))} KB`;
}

async function showOutputs() {
  const id = $("#outputs-run").value;
  if (!id) return;
  const d = await api(`/api/runs/details?run=${encodeURIComponent(id)}`);
  const report = $("#outputs-report");
  report.hidden = !d.report;
  report.href = fileUrl(id, "report.html");
  const log = $("#outputs-log");
  log.hidden = !d.log;
  log.href = fileUrl(id, "train.log");
  const facts = [["status", d.status], ["folder", d.path], ["steps", d.steps], ["last loss", d.last.loss != null ? d.last.loss.toFixed(5) : "—"],
    ...["family", "flavour", "model", "adapter"].filter((k) => d.run[k]).map((k) => [k, d.run[k]])];
  const body = [el("table", { class: "facts" }, facts.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: String(v) }))))];
  body.push(el("h3", { text: "Adapter" }));
  body.push(d.adapter.length ? el("ul", { class: "files" }, d.adapter.map((f) => el("li", {}, f.path === "transformer" ? el("code", { text: f.name }) :
    el("a", { href: fileUrl(id, f.path, true), download: f.name, text: f.name }), ` ${size(f.size)}`))) : el("p", { class: "muted", text: "Written when the run finishes." }));
  if (d.loading_example) body.push(el("h3", { text: "Load it" }), el("pre", { class: "snippet", text: d.loading_example.replace(/^ {4}/gm, "") }));
  body.push(el("h3", { text: `Checkpoints (${d.checkpoints.length})` }));
  body.push(d.checkpoints.length ? el("table", { class: "list" }, el("tr", {}, el("th", { text: "checkpoint" }), el("th", { text: "files" })),
    d.checkpoints.map((c) => el("tr", {}, el("td", {}, el("code", { text: c.name })),
      el("td", {}, c.files.filter((f) => !f.path.includes("/random_states")).map((f) => el("span", {}, el("a", { href: fileUrl(id, f.path, true), text: f.path.split("/").slice(1).join("/") }), ` ${size(f.size)}  `)))))) :
    el("p", { class: "muted", text: "None yet." }));
  body.push(el("h3", { text: `Validation images (${d.images.length})` }));
  const columns = [...new Set(d.images.map((i) => i.column))];
  const names = [...new Set(d.images.map((i) => i.name))];
  if (d.images.length) {
    body.push(el("div", { class: "grid" }, el("table", {}, el("tr", {}, el("th"), columns.map((c) => el("th", { text: c === "base" ? "base model" : c.replace("step-0*", "step ").replace(/^step-0*/, "step ") }))),
      names.map((n) => el("tr", {}, el("th", { text: n }), columns.map((c) => {
        const image = d.images.find((i) => i.column === c && i.name === n);
        return el("td", {}, image ? el("a", { href: fileUrl(id, image.file), target: "_blank" }, el("img", { src: fileUrl(id, image.file), alt: `${c} ${n}` })) : null);
      }))))));
  }
  $("#outputs-body").replaceChildren(...body);
}

async function loadCompare() {
  const [runs, first] = await Promise.all([api("/api/runs"), api("/api/compare?metric=loss")]);
  const metric = $("#compare-metric");
  if (!metric.options.length) {
    metric.replaceChildren(...Object.entries(first.metrics).map(([k, v]) => el("option", { value: k, text: v })));
    metric.addEventListener("change", drawCompare);
  }
  const box = $("#compare-runs");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  box.replaceChildren(...runs.runs.map((r) => el("label", {}, el("input", { type: "checkbox", value: r.id, checked: checked.size ? checked.has(r.id) : true, onchange: drawCompare }), ` ${r.id} (${r.steps} steps)`)));
  await drawCompare();
}

async function drawCompare() {
  const runs = [...document.querySelectorAll("#compare-runs input:checked")].map((i) => i.value);
  const query = runs.map((r) => `run=${encodeURIComponent(r)}`).join("&");
  const data = await api(`/api/compare?metric=${$("#compare-metric").value || "loss"}&${query}`);
  $("#compare-chart").innerHTML = data.svg || "<p class='muted'>No steps recorded in the chosen runs.</p>";
}

// ---- start ----------------------------------------------------------------------------------------
async function main() {
  state.schema = await api("/api/schema");
  $("#project").textContent = state.schema.project;
  await Promise.all([loadConfig(), loadDatasets(), loadLycoris()]);
  $("#option-filter").addEventListener("input", applyFilter);
  $("#only-set").addEventListener("change", applyFilter);
  $("#config-save").addEventListener("click", saveConfig);
  $("#lycoris-preset").addEventListener("change", () => {
    const preset = state.schema.lycoris_presets[$("#lycoris-preset").value];
    if (!preset) return;
    $("#lycoris-json").value = JSON.stringify(preset.settings, null, 2);
    const algo = $("#lycoris-algo");
    if (![...algo.options].some((o) => o.value === preset.settings.algo)) algo.append(el("option", { value: preset.settings.algo, text: preset.settings.algo }));
    algo.value = preset.settings.algo;
    $("#lycoris-preset-help").textContent = `From ${preset.source}.`;
  });
  $("#lycoris-algo").addEventListener("change", () => {
    const settings = lycorisJson() || {};
    settings.algo = $("#lycoris-algo").value;
    $("#lycoris-json").value = JSON.stringify(settings, null, 2);
  });
  $("#lycoris-save").addEventListener("click", async () => {
    const settings = lycorisJson();
    if (settings === null) { setStatus($("#lycoris-status"), "The LyCORIS config is not valid JSON.", false); return; }
    setStatus($("#lycoris-status"), "Saving (checked against the installed LyCORIS)…");
    try {
      const data = await api("/api/lycoris", { method: "PUT", body: { settings } });
      setStatus($("#lycoris-status"), `Saved ${data.path}.`, true);
    } catch (error) { setStatus($("#lycoris-status"), error.message, false); }
  });
  $("#dataset-add").addEventListener("click", () => {
    const ids = new Set(state.datasets.map((d) => d.id));
    let n = state.datasets.length + 1;
    while (ids.has(`dataset-${n}`)) n += 1;
    state.datasets.push({ id: `dataset-${n}`, type: "local", instance_data_dir: "", caption_strategy: "textfile" });
    renderDatasets([]);
  });
  $("#datasets-save").addEventListener("click", saveDatasets);
  $("#datasets-check").addEventListener("click", async () => { if (await saveDatasets()) await checkDatasets(); });
  $("#run-start").addEventListener("click", startRun);
  $("#run-stop").addEventListener("click", () => stopRun(false));
  $("#run-kill").addEventListener("click", () => stopRun(true));
  $("#outputs-run").addEventListener("change", showOutputs);
  $("#outputs-refresh").addEventListener("click", loadRuns);
  window.addEventListener("hashchange", showTab);
  progressFacts(null);
  loadDevices();
  connectEvents();
  showTab();
  document.body.dataset.ready = "true";
}

main().catch((error) => {
  document.body.prepend(el("p", { class: "status bad", text: `The page could not load: ${error.message}` }));
});
