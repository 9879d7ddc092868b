// tuneq dashboard: each page fills #content from the JSON API and polls it, so it updates
// without a reload. Text goes into the page as text nodes only (never as HTML): names, errors
// and specs a user typed cannot become markup. Actions send the token in a header.
"use strict";

const PAGE = document.body.dataset.page;
const KEY = document.body.dataset.key;
const POLL_MS = 1500;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d",
  "#4d7c0f", "#7c3aed", "#475569"];

function h(tag, attrs, ...children) {
  const svg = ["svg", "polyline", "line", "text", "circle", "rect", "g"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "width%") node.style.width = value + "%";
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

let fetched = [];  // the bodies this refresh read: unchanged ones leave the page as it is

async function api(path) {
  const answer = await fetch(path, { headers: { accept: "application/json" } });
  const text = await answer.text();
  fetched.push(text);
  let data = {};
  try { data = JSON.parse(text); } catch (error) { /* an error page: its status says */ }
  if (!answer.ok) throw new Error(data.error || answer.statusText);
  return data;
}

function token() { return sessionStorage.getItem("tuneq-token") || ""; }

async function act(path, body) {
  const answer = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json", "x-tuneq-token": token() },
    body: typeof body === "string" ? body : JSON.stringify(body || {}),
  });
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(`${answer.status}: ${data.error || answer.statusText}`);
  return data;
}

function notice(text, error) {
  const box = document.getElementById("notice");
  box.hidden = !text;
  box.className = error ? "error" : "";
  box.textContent = text || "";
}

// ---- formatting ----

function seconds(value) {
  if (value === null || value === undefined) return "?";
  let s = Math.round(value);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60); s %= 60;
  if (m < 60) return `${m}m${String(s).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, "0")}m`;
}

function num(value, digits = 4) {
  return typeof value === "number" ? value.toFixed(digits) : "-";
}

function when(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : "-"; }

function ago(iso) {
  if (!iso) return "-";
  const zoned = /[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : iso + "Z";
  return seconds((Date.now() - Date.parse(zoned)) / 1000) + " ago";
}

function duration(job) {
  if (!job.started_at || !job.finished_at) return "";
  return seconds((Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000);
}

function headline(metrics) {
  const m = metrics || {};
  if ("mae" in m) return [["MAE", m.mae], ["Spearman", m.spearman]];
  if ("micro_f1" in m) return [["micro-F1", m.micro_f1], ["macro-F1", m.macro_f1]];
  if ("rows" in m) return [["rows", m.rows], ["rows/s", m.rows_per_second]];
  return [["accuracy", m.accuracy], ["macro-F1", m.macro_f1]];
}

function headlineText(metrics) {
  if (!metrics) return "";
  return headline(metrics).filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k} ${Number.isInteger(v) ? v : num(v)}`).join(", ");
}

function status(value) { return h("span", { class: `status status-${value}` }, value); }

function jobLink(id, text) { return h("a", { href: `/jobs/${encodeURIComponent(id)}` }, text || id); }

function groupLink(id) { return id ? h("a", { href: `/groups/${encodeURIComponent(id)}` }, id) : ""; }

function table(headers, rows, options = {}) {
  const numeric = new Set(options.numeric || []);
  const head = h("tr", {}, headers.map((name, i) => h("th", { class: numeric.has(i) ? "num" : null }, name)));
  const body = rows.map((row) => h("tr", row.attrs || {},
    row.cells.map((cell, i) => h("td", { class: numeric.has(i) ? "num" : null }, cell))));
  return h("div", { class: "table-wrap" },
    h("table", { id: options.id }, h("thead", {}, head), h("tbody", {}, body)));
}

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

// ---- progress and charts ----

function progressOf(job) {
  const p = job.progress || {};
  const rows = "total_rows" in p;
  return {
    phase: p.phase || job.status,
    done: rows ? p.rows : p.step,
    total: rows ? p.total_rows : p.total,
    unit: rows ? "rows" : "steps",
    rate: rows ? p.rows_per_s : p.steps_per_s,
    eta: p.eta_s,
    loss: p.loss,
  };
}

function progressBlock(job) {
  const p = progressOf(job);
  const known = typeof p.done === "number" && p.total;
  const share = known ? Math.min(100, (100 * p.done) / p.total) : 0;
  const parts = [p.phase];
  if (known) parts.push(`${p.done}/${p.total} ${p.unit}`);
  if (typeof p.rate === "number") parts.push(`${p.rate.toFixed(2)} ${p.unit}/s`);
  if (typeof p.loss === "number") parts.push(`loss ${p.loss.toFixed(4)}`);
  if (typeof p.eta === "number") parts.push(`ETA ${seconds(p.eta)}`);
  return h("div", { class: "progress", "data-done": known ? p.done : null, "data-total": p.total },
    h("div", { class: "bar" }, h("span", { "width%": share.toFixed(1) })),
    h("span", { class: "muted" }, parts.join(" · ")));
}

// series: [{name, points: [[x, y], ...]}]; draws lines (or dots with options.dots).
function chart(series, options = {}) {
  const width = options.width || 560, height = options.height || 220, pad = 34;
  const all = series.flatMap((s) => s.points);
  const svg = h("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width, height,
    role: "img", "aria-label": options.label || "chart" });
  if (!all.length) {
    svg.append(h("text", { x: width / 2 - 40, y: height / 2 }, "no points yet"));
    return svg;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad + ((x - x0) / (x1 - x0)) * (width - 2 * pad);
  const Y = (y) => height - pad + 10 - ((y - y0) / (y1 - y0)) * (height - 2 * pad);
  svg.append(
    h("line", { x1: pad, y1: height - pad + 10, x2: width - pad, y2: height - pad + 10, stroke: "#ccc" }),
    h("line", { x1: pad, y1: pad - 10, x2: pad, y2: height - pad + 10, stroke: "#ccc" }),
    h("text", { x: 2, y: pad - 12 }, num(y1, 3)),
    h("text", { x: 2, y: height - pad + 10 }, num(y0, 3)),
    h("text", { x: pad, y: height - 6 }, String(+x0.toFixed(6))),
    h("text", { x: width - pad - 30, y: height - 6 }, String(+x1.toFixed(6))),
    h("text", { x: width / 2 - 20, y: height - 6 }, options.x || ""),
  );
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    if (options.dots) {
      s.points.forEach(([x, y]) => svg.append(h("circle", { cx: X(x), cy: Y(y), r: 4, fill: color })));
    } else {
      const points = s.points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ");
      svg.append(h("polyline", { points, fill: "none", stroke: color, "stroke-width": 1.6,
        "data-series": s.name }));
    }
  });
  const figure = h("figure", {}, svg);
  if (series.length > 1 || options.legend) {
    figure.append(h("figcaption", { class: "legend" }, series.map((s, i) => h("span", {},
      h("i", { class: `swatch-${i % COLORS.length}` }), s.name))));
    figure.querySelectorAll("figcaption i").forEach((node, i) => {
      node.style.background = series[i].color || COLORS[i % COLORS.length];
    });
  }
  return figure;
}

function lossSeries(job) {
  const m = job.metrics || {};
  const train = (m.loss_curve || []).map((p) => [p.step, p.loss]);
  const live = ((job.progress || {}).curve || []);
  const series = [{ name: "training loss", points: train.length ? train : live }];
  const evaluation = (m.eval_curve || []).map((p) => [p.step, p.loss]);
  if (evaluation.length) series.push({ name: "evaluation loss", points: evaluation });
  return series;
}

// ---- pages ----

const PAGES = {
  async queue() {
    const data = await api("/api/overview");
    const counts = Object.entries(data.counts).map(([s, n]) => h("span", {}, status(s), ` ${n}`));
    const running = data.queue.filter((e) => !e.position);
    const waiting = data.queue.filter((e) => e.position);
    const cards = running.map((e) => {
      const job = data.jobs[e.job] || { id: e.job, spec: {}, status: "running", queue: e.queue };
      const card = h("div", { class: "card", "data-job": job.id },
        h("div", {}, jobLink(job.id), " ", h("span", { class: "muted" }, job.kind), " ",
          job.spec.name ? h("strong", {}, job.spec.name) : "", " ", status(job.status)),
        h("div", { class: "muted" }, `${job.queue} · ${job.worker || "claimed"} · ends in ~${seconds(e.end_in_s)}`),
        progressBlock(job));
      if (job.kind === "finetune") card.append(chart(lossSeries(job).slice(0, 1), { width: 300, height: 120, label: "loss" }));
      return card;
    });
    const rows = waiting.map((e) => {
      const job = data.jobs[e.job] || { spec: {} };
      return { attrs: { "data-job": e.job }, cells: [e.position, jobLink(e.job), job.spec.name || "",
        job.kind || "", status(job.status || "queued"), e.queue, e.priority,
        e.start_in_s === null ? "?" : `~${seconds(e.start_in_s)}`,
        e.end_in_s === null ? "?" : `~${seconds(e.end_in_s)}`, e.basis] };
    });
    return [
      h("div", { class: "counts" }, counts.length ? counts : h("span", { class: "muted" }, "no jobs yet")),
      h("h2", {}, `Running (${running.length})`),
      cards.length ? h("div", { class: "cards", id: "running" }, cards) : h("p", { class: "muted" }, "nothing runs"),
      h("h2", {}, `Waiting (${waiting.length}), in run order`),
      rows.length ? table(["#", "job", "name", "kind", "status", "queue", "priority", "starts in",
        "ends in", "estimated from"], rows, { id: "waiting", numeric: [0] })
        : h("p", { class: "muted" }, "nothing waits"),
    ];
  },

  async jobs() {
    const form = document.getElementById("filters");
    const query = new URLSearchParams([...new FormData(form)].filter(([, v]) => v));
    const jobs = await api(`/api/jobs?${query}`);
    const rows = jobs.map((job) => ({ attrs: { "data-job": job.id }, cells: [
      jobLink(job.id), job.kind, status(job.status), job.spec.name || "", job.spec.model || "",
      groupLink(job.group), when(job.created_at),
      job.status === "running" ? progressBlock(job) : duration(job), headlineText(job.metrics)] }));
    return rows.length ? table(["job", "kind", "status", "name", "model", "group", "created",
      "time", "metrics"], rows, { id: "jobs" }) : h("p", { class: "muted" }, "no jobs match");
  },

  async job() {
    const job = await api(`/api/jobs/${encodeURIComponent(KEY)}`);
    const active = ["queued", "retrying", "running"].includes(job.status);
    document.getElementById("cancel").disabled = !active;
    document.getElementById("retry").disabled = !["failed", "cancelled"].includes(job.status);
    const m = job.metrics || {};
    const parts = [kv([
      ["status", status(job.status)], ["kind", job.kind], ["name", job.spec.name],
      ["queue", job.queue], ["attempt", `${job.attempt}${job.worker ? " on " + job.worker : ""}`],
      ["group", groupLink(job.group)], ["created", when(job.created_at)],
      ["started", when(job.started_at)], ["finished", when(job.finished_at)],
      ["duration", duration(job)],
      ["progress", active && job.progress ? progressBlock(job) : null],
      ["estimate", job.estimate ? (job.estimate.position ? `#${job.estimate.position} on ${job.estimate.queue}; starts in ~${seconds(job.estimate.start_in_s)}, ends in ~${seconds(job.estimate.end_in_s)}` : `ends in ~${seconds(job.estimate.end_in_s)}`) : null],
      ["model", job.model ? `${job.model.name}:${job.model.version} (${job.model.path})` : null],
      ["output", job.output_path],
    ])];
    if (job.error) {
      parts.push(h("h2", {}, "Error"), h("pre", { id: "error" }, job.error));
      if (job.traceback) parts.push(h("details", {}, h("summary", {}, "traceback"), h("pre", {}, job.traceback)));
    }
    if (Object.keys(m).length) {
      parts.push(h("h2", {}, "Metrics"), kv([
        ...headline(m).map(([k, v]) => [k, typeof v === "number" ? String(Number.isInteger(v) ? v : v.toFixed(4)) : null]),
        ["eval loss", typeof m.eval_loss === "number" ? num(m.eval_loss) : null],
        ["train loss", typeof m.train_loss === "number" ? `${num(m.train_loss)} (${m.train_steps} steps)` : null],
        ["kept", m.training ? `step ${m.training.best_step} of ${m.training.final_step}, best ${m.training.metric} ${num(m.training.best_metric)}; ${m.training.stop_reason}` : null],
        ["calibration", m.calibration ? `temperature ${m.calibration.temperature.toPrecision(3)}, ECE ${num(m.calibration.ece_before)} → ${num(m.calibration.ece_after)}` : null],
        ["phases", m.phases ? Object.entries(m.phases).map(([k, v]) => `${k} ${v.toFixed(1)}s`).join(", ") : null],
      ]));
      const perClass = m.per_class || {};
      // The model's label order (JavaScript would put names like "10" before "x").
      const labels = (job.model && job.model.labels) || [];
      const names = labels.length === Object.keys(perClass).length ? labels : Object.keys(perClass);
      if (names.length) {
        parts.push(h("h2", {}, "Per class"), table(["label", "precision", "recall", "f1", "support"],
          names.map((n) => ({ cells: [n, num(perClass[n].precision), num(perClass[n].recall),
            num(perClass[n].f1), perClass[n].support] })), { numeric: [1, 2, 3, 4] }));
      }
      if (m.confusion_matrix && names.length) {
        parts.push(h("h2", {}, "Confusion matrix"), table(["true \\ predicted", ...names],
          m.confusion_matrix.map((row, i) => ({ cells: [names[i], ...row] })),
          { id: "confusion", numeric: names.map((_, i) => i + 1) }));
      }
    }
    if (job.kind === "finetune" && (m.loss_curve || (job.progress || {}).curve)) {
      parts.push(h("h2", {}, "Loss"), chart(lossSeries(job), { x: "step", label: "loss curve", legend: true }));
    }
    const set = Object.fromEntries(Object.entries(job.spec).filter(([, v]) => v !== null));
    parts.push(h("h2", {}, "Spec"), h("pre", {}, JSON.stringify(set, null, 2)));
    if (job.events.length) {
      parts.push(h("h2", {}, "Events"), table(["at", "attempt", "kind", "message"],
        job.events.map((e) => ({ cells: [when(e.at), e.attempt, e.kind, e.message] })), { id: "events" }));
    }
    return parts;
  },

  async groups() {
    const groups = await api("/api/groups");
    return groups.length ? table(["group", "jobs", "created", "states"], groups.map((g) => ({
      cells: [groupLink(g.group), g.size, when(g.created_at),
        Object.entries(g.statuses).map(([s, n]) => `${s} ${n}`).join(", ")] })), { numeric: [1] })
      : h("p", { class: "muted" }, "no groups yet; `tuneq sweep FILE` starts one");
  },

  async group() {
    const data = await api(`/api/groups/${encodeURIComponent(KEY)}`);
    const columns = data.compare.length ? Object.keys(data.compare[0]) : [];
    const parts = [h("h2", {}, "Runs, best first"), table(columns, data.compare.map((row) => ({
      attrs: { "data-job": row.job },
      cells: columns.map((c) => c === "job" ? jobLink(row[c]) : c === "status" ? status(row[c])
        : typeof row[c] === "number" && !Number.isInteger(row[c]) ? num(row[c]) : row[c] ?? ""),
    })), { id: "compare" })];
    const curves = Object.entries(data.curves).filter(([, points]) => points.length)
      .map(([job, points]) => ({ name: job, points: points.map((p) => [p.step, p.loss]) }));
    parts.push(h("h2", {}, "Training loss, every run"), chart(curves, { x: "step", label: "loss curves", legend: true }));
    const metric = data.metric;  // what ranks the runs (and picked each one's best checkpoint)
    const plots = data.varied.filter((field) => data.compare.some((r) => typeof r[field] === "number"))
      .map((field) => h("div", {}, h("h2", {}, `${metric} by ${field}`), chart([{ name: metric,
        points: data.compare.filter((r) => typeof r[field] === "number" && typeof r[metric] === "number")
          .map((r) => [r[field], r[metric]]) }], { dots: true, x: field, width: 360, height: 200, label: `${metric} by ${field}` })));
    if (plots.length) parts.push(h("div", { class: "grid2" }, plots));
    return parts;
  },

  async models() {
    const models = await api("/api/models");
    return models.length ? table(["model", "base", "labels", "metrics", "tags", "created", "job", "path"],
      models.map((m) => ({ attrs: { "data-model": `${m.name}:${m.version}` }, cells: [
        `${m.name}:${m.version}`, m.base_model, (m.labels || []).join(", "), headlineText(m.metrics),
        (m.tags || []).join(", "), when(m.created_at), m.job_id ? jobLink(m.job_id) : "", m.path] })),
      { id: "models" }) : h("p", { class: "muted" }, "no models yet; a successful fine-tune registers one");
  },

  async workers() {
    const workers = await api("/api/workers");
    return workers.length ? table(["worker", "host", "queues", "device", "processes", "threads",
      "running", "started", "last seen"], workers.map((w) => ({ attrs: { "data-worker": w.name }, cells: [
      w.name, w.hostname, w.queues.join(", "), w.device, w.concurrency, w.threads,
      w.running.length ? w.running.map((r) => [jobLink(r.split("/")[0], r), " "]) : "-",
      when(w.started_at), ago(w.heartbeat_at)] })), { id: "workers", numeric: [4, 5] })
      : h("p", { class: "muted" }, "no live workers; start one with `tuneq worker`");
  },
};

// ---- wiring ----

let busy = false;
let failing = false;  // the notice shows a failed refresh, to clear once one works again
let shown = null;  // what the page shows now, as the API bodies it was drawn from
async function refresh(force) {
  if (busy || document.hidden) return;
  busy = true;
  try {
    fetched = [];
    const nodes = await PAGES[PAGE]();
    const drawn = fetched.join("\n");
    // Redrawing unchanged data would close an open traceback and drop a selection.
    if (force === true || drawn !== shown) {
      document.getElementById("content").replaceChildren(...[nodes].flat());
      shown = drawn;
    }
    if (failing) notice("");
    failing = false;
  } catch (error) {
    notice(String(error.message || error), true);
    failing = true;
  } finally {
    busy = false;
  }
}

function showTokenState() {
  document.getElementById("token-state").textContent = token() ? "actions on" : "read-only";
}

function wire() {
  const tokenInput = document.getElementById("token");
  tokenInput.value = token();
  document.getElementById("token-form").addEventListener("submit", (e) => e.preventDefault());
  tokenInput.addEventListener("change", () => {
    sessionStorage.setItem("tuneq-token", tokenInput.value.trim());
    showTokenState();
  });
  showTokenState();
  const run = (fn) => async (event) => {
    event.preventDefault();
    try { notice(await fn(), false); await refresh(); } catch (error) { notice(error.message, true); }
  };
  const on = (id, type, fn) => { const node = document.getElementById(id); if (node) node.addEventListener(type, run(fn)); };
  const path = `/api/jobs/${encodeURIComponent(KEY)}`;
  on("cancel", "click", async () => `cancelled ${(await act(`${path}/cancel`)).cancelled}`);
  on("retry", "click", async () => `queued ${(await act(`${path}/retry`)).queued} again`);
  on("submit-form", "submit", async () => {
    const answer = await act("/api/jobs", document.getElementById("job-file").value);
    return `queued ${answer.queued}`;
  });
  on("tag-form", "submit", async () => {
    const model = document.getElementById("tag-model").value.trim();
    const answer = await act(`/api/models/${encodeURIComponent(model)}/tags`,
      { tag: document.getElementById("tag-name").value.trim() });
    return `tagged ${answer.tagged} ${answer.tag}`;
  });
  const filters = document.getElementById("filters");
  if (filters) {
    new URLSearchParams(location.search).forEach((value, name) => {
      if (filters.elements[name]) filters.elements[name].value = value;
    });
    filters.addEventListener("input", () => {
      const query = new URLSearchParams([...new FormData(filters)].filter(([, v]) => v));
      history.replaceState(null, "", `?${query}`);
      refresh(true);
    });
  }
}

wire();
refresh();
setInterval(refresh, POLL_MS);
