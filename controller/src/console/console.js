// The maintenance console's script (served at /console.js; the page has no inline script).
// Every string shown comes from window.I18N (i18n.js) through t() and tn(); names from the
// backend (reason codes, mode bits, alarms, commands, directions) are looked up by name.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const I18N = window.I18N;
  // The station mode bits, in bit order (afc_domain::mode::ModeBits::NAMED).
  const MODE_BITS = ["train_disruption", "time_free", "date_free", "fare_free", "sequence_free",
    "entry_free", "hours_24", "emergency_release", "closed"];
  const FLOW_MINUTES = 60;

  let token = sessionStorage.getItem("afc-token") || "";
  let timer = null;
  let lang = pickLang();
  // The last answers of the API, so a language switch re-renders at once.
  let data = null;
  let selected = null;
  let cmdAnswer = null;
  let search = { next: null, entries: [], scanned: 0, error: null, done: false };
  // The business day and reports asked for last (GET /api/v1/days/{day}, /api/v1/reports/...).
  let reports = null;

  // The saved choice, else Chinese when the browser's first language is Chinese, else English.
  function pickLang() {
    const saved = localStorage.getItem("afc-lang");
    if (saved && I18N[saved]) return saved;
    const first = (navigator.languages && navigator.languages[0]) || navigator.language || "";
    return first.toLowerCase().startsWith("zh") ? "zh-CN" : "en";
  }

  // The string `key` in the chosen language, with {name} placeholders filled from `vars`.
  function t(key, vars) {
    let s = I18N[lang][key];
    if (s === undefined) s = I18N.en[key];
    if (s === undefined) return key;
    if (vars) s = s.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? String(vars[k]) : m));
    return s;
  }

  // A backend name (`reason.no_entry`, `mode.fare_free`, `alarm.door_fault`) in the chosen
  // language; a name this console does not know yet is shown as it is.
  function tn(prefix, name) {
    const k = prefix + "." + name;
    return k in I18N[lang] ? I18N[lang][k] : String(name);
  }

  function esc(s) {
    return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  function fmtTime(ms) {
    return ms == null ? "–" : new Date(ms).toLocaleString(lang, { hour12: false });
  }

  // A duration in ms as "2h 05m", "4m 10s" or "12s" (units from the table).
  function dur(ms) {
    const s = Math.floor(ms / 1000), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    if (h) return t("dur.hm", { h, m: String(m).padStart(2, "0") });
    if (m) return t("dur.ms", { m, s: String(s % 60).padStart(2, "0") });
    return t("dur.s", { s });
  }

  async function api(method, path, body) {
    const opts = { method, headers: { Authorization: "Bearer " + token } };
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    const r = await fetch(path, opts);
    const d = await r.json().catch(() => ({}));
    if (!r.ok) { const e = new Error(d.message || r.statusText); e.status = r.status; e.code = d.code; throw e; }
    return d;
  }

  function applyLang() {
    document.documentElement.lang = lang;
    $("lang").value = lang;
    document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
    document.title = t("title");
    render();
  }

  function renderMode(m) {
    $("mode-names").textContent = m.names.map((n) => tn("mode", n)).join(" + ");
    $("mode-er").classList.toggle("hidden", !m.emergency_release);
    $("er-open").textContent = m.emergency_release ? t("er.end") : t("er.open");
    $("mode-bits").innerHTML = MODE_BITS.map((b) => {
      const on = m.names.includes(b);
      const button = b === "emergency_release"
        ? `<button class="mode-er-open">${esc(t("er.use_dialog"))}</button>`
        : `<button class="mode-toggle" data-bit="${b}" data-set="${on}">${esc(on ? t("mode.clear") : t("mode.set"))}</button>`;
      return `<tr data-bit="${b}" class="${on ? "bit-set" : ""}"><td>${esc(tn("mode", b))}</td><td class="bit-state">${esc(on ? t("mode.is_set") : t("mode.is_clear"))}</td><td>${button}</td></tr>`;
    }).join("");
  }

  function renderGates(gates, m) {
    $("gate-count").textContent = gates.length;
    const er = m && m.emergency_release;
    $("gates").innerHTML = gates.map((g) => {
      const free = g.free_passage || er;
      const cls = ["gate", g.online ? "online" : "offline", free ? "free" : "", g.gate === selected ? "selected" : ""].join(" ");
      const versions = Object.entries(g.desired_versions).map(([k, v]) => {
        const rep = g.reported_versions[k];
        return `<div class="${g.drift.includes(k) ? "drift" : ""}">${esc(tn("kind", k))}: ${esc(rep ?? "–")} / ${esc(v)}</div>`;
      }).join("");
      return `<div class="${cls}" data-gate="${esc(g.gate)}">
        <div class="name">${esc(g.gate)}</div>
        <div>${esc(g.online ? t("gate.online") : t("gate.offline"))} · ${esc(g.direction ? tn("dir", g.direction) : t("gate.direction_unknown"))}</div>
        <div>${esc(g.in_service ? t("gate.in_service") : t("gate.out_of_service"))}</div>
        <div class="passage">${free ? `<b>${esc(t("gate.free_passage"))}</b>` : esc(t("gate.normal_passage"))}</div>
        ${g.alarms.map((a) => `<div class="alarm" data-alarm="${esc(a)}">${esc(tn("alarm", a))}</div>`).join("")}
        ${versions}
        <div>${esc(t("gate.ledger_seq", { seq: g.ledger_through_seq ?? "–" }))}</div>
        ${g.sequence_gaps ? `<div class="alarm">${esc(t("gate.gaps", { n: g.sequence_gaps }))}</div>` : ""}
        ${g.key_conflicts ? `<div class="alarm">${esc(t("gate.conflicts", { n: g.key_conflicts }))}</div>` : ""}
      </div>`;
    }).join("");
  }

  function renderGateDetail(gates, flow) {
    const g = gates.find((x) => x.gate === selected);
    $("gate-detail").classList.toggle("hidden", !g);
    if (!g) return;
    $("gd-name").textContent = g.gate;
    $("gd-counters").innerHTML = ["entries", "exits", "taps", "rejects", "tailgating", "forced_passage", "outbox_depth"]
      .map((k) => `<tr data-counter="${k}"><th>${esc(tn("counter", k))}</th><td>${esc(g.counters[k] ?? "–")}</td></tr>`).join("")
      + `<tr><th>${esc(t("gate.last_seen"))}</th><td>${esc(fmtTime(g.last_seen_ms))}</td></tr>`;
    const rej = ((flow && flow.rejects) || []).find((r) => r.gate === g.gate);
    const reasons = rej ? Object.entries(rej.by_reason).sort((a, b) => b[1] - a[1]) : [];
    $("gd-rejects").innerHTML = reasons.length
      ? reasons.map(([r, n]) => `<tr data-reason="${esc(r)}"><th>${esc(tn("reason", r))}</th><td>${esc(n)}</td></tr>`).join("")
      : `<tr><td>${esc(t("none"))}</td></tr>`;
    $("gd-alarms").innerHTML = g.alarms.length
      ? g.alarms.map((a) => `<tr data-alarm="${esc(a)}"><th class="alarm">${esc(tn("alarm", a))}</th><td>${esc(t("gate.alarm_since", { at: fmtTime((g.alarms_since_ms || {})[a]) }))}</td></tr>`).join("")
      : `<tr><td>${esc(t("none"))}</td></tr>`;
    const kinds = [...new Set([...Object.keys(g.desired_versions), ...Object.keys(g.reported_versions)])].sort();
    $("gd-versions").innerHTML = kinds.map((k) => `<tr class="${g.drift.includes(k) ? "drift" : ""}"><td>${esc(tn("kind", k))}</td><td>${esc(g.desired_versions[k] ?? "–")}</td><td>${esc(g.reported_versions[k] ?? "–")}</td></tr>`).join("");
    $("cmd-direction").classList.toggle("hidden", $("cmd-kind").value !== "set_direction");
    const res = $("cmd-result");
    if (!cmdAnswer || cmdAnswer.gate !== g.gate) { res.textContent = ""; res.dataset.result = ""; return; }
    res.dataset.result = cmdAnswer.ok ? "ok" : "error";
    res.className = cmdAnswer.ok ? "ok" : "alarm";
    res.textContent = cmdAnswer.ok
      ? t("cmd.answered", { command: tn("cmd", cmdAnswer.command), result: tn("result", cmdAnswer.result), id: cmdAnswer.id })
      : cmdAnswer.error;
  }

  // The flow chart: two polylines (entries, exits) over the last hour, drawn as SVG here.
  // Clears `svg`, sizes it one user unit per CSS pixel (so text is not stretched) and returns
  // its width and an element maker appending to it.
  function svgCanvas(svg, H) {
    const W = Math.max(300, Math.round(svg.getBoundingClientRect().width) || 600);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const el = (name, attrs, text) => {
      const e = document.createElementNS("http://www.w3.org/2000/svg", name);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e);
      return e;
    };
    return { W, el };
  }

  function renderFlow(flow) {
    const svg = $("flow-chart");
    const H = 200, L = 34, R = 8, T = 8, B = 22;
    const { W, el } = svgCanvas(svg, H);
    const pts = flow.points;
    const max = Math.max(1, ...pts.map((p) => Math.max(p.entries, p.exits)));
    const x = (i) => L + (pts.length > 1 ? (i * (W - L - R)) / (pts.length - 1) : 0);
    const y = (v) => T + (H - T - B) * (1 - v / max);
    for (const v of [0, Math.round(max / 2), max]) {
      el("line", { class: v ? "grid" : "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) });
      el("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, String(v));
    }
    pts.forEach((p, i) => {
      if (i % 15 === 0 || i === pts.length - 1) {
        const d = new Date(p.minute_ms);
        el("text", { x: x(i), y: H - 6, "text-anchor": i === 0 ? "start" : i === pts.length - 1 ? "end" : "middle" }, `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`);
      }
    });
    for (const dir of ["entries", "exits"]) {
      el("polyline", {
        class: `series ${dir}`, id: `flow-${dir}`,
        points: pts.map((p, i) => `${x(i).toFixed(1)},${y(p[dir]).toFixed(1)}`).join(" "),
        "data-values": pts.map((p) => p[dir]).join(","),
      });
    }
    const sum = (k) => pts.reduce((a, p) => a + p[k], 0);
    svg.dataset.entries = sum("entries");
    svg.dataset.exits = sum("exits");
    $("flow-totals").textContent = t("flow.totals", { entries: sum("entries"), exits: sum("exits") })
      + (flow.complete ? "" : " " + t("flow.incomplete"));
    el("title", {}, t("flow.title"));
  }

  function renderSearch() {
    $("ls-results").innerHTML = search.entries.map((e) => {
      const r = e.record;
      return `<tr><td>${esc(e.index)}</td><td>${esc(fmtTime(r.occurred_at))}</td><td>${esc(r.gate)}</td><td>${esc(tn("dir", r.direction))}</td><td>${esc(tn("media", r.media))}</td><td>${esc(r.id)}</td><td class="${r.accepted ? "ok" : "alarm"}" data-reason="${esc(r.reason)}">${esc(tn("reason", r.reason))}</td><td>${esc(t("fen", { yuan: (r.fare_fen / 100).toFixed(2) }))}</td></tr>`;
    }).join("");
    $("ls-more").classList.toggle("hidden", search.next == null);
    $("ls-error").textContent = search.error || "";
    $("ls-status").textContent = search.done || search.entries.length
      ? t("search.status", { n: search.entries.length, scanned: search.scanned }) + (search.next != null ? " " + t("search.has_more") : "")
      : "";
  }

  // The audit query: the latest 20 lines whose actor and action contain what is typed (the
  // server filters, over the whole log).
  function auditPath() {
    const q = new URLSearchParams({ limit: "20" });
    const actor = $("audit-actor").value.trim(), action = $("audit-action").value.trim();
    if (actor) q.set("actor", actor);
    if (action) q.set("action", action);
    return "/api/v1/audit?" + q.toString();
  }

  function renderAudit(lines) {
    const shown = lines.slice().reverse();
    $("audit").innerHTML = shown.map((a) => `<tr class="audit-line"><td>${esc(fmtTime(a.at))}</td><td>${esc(a.actor)}</td><td>${esc(a.action)}</td><td>${esc(a.detail)}</td></tr>`).join("")
      || `<tr><td>${esc(t("none"))}</td></tr>`;
  }

  function render() {
    renderSearch();
    renderReports();
    if (!data) return;
    const { mode, gates, cluster, stats, clearing, params, audit, rollouts, flow } = data;
    renderMode(mode);
    renderGates(gates, mode);
    renderGateDetail(gates, flow);
    renderFlow(flow);
    renderAudit(audit);
    $("cluster-summary").textContent = t("cluster.summary", {
      id: cluster.node_id, role: tn("role", cluster.role), leader: cluster.leader ?? t("none"), term: cluster.term,
      commit: cluster.commit_index ?? "–", applied: cluster.applied_index ?? "–",
    });
    $("nodes").innerHTML = cluster.members.map((n) => `<tr><td>${esc(n.id)}${n.id === cluster.leader ? " ★" : ""}</td><td>${esc(n.addr)}</td><td>${esc(n.voter ? t("cluster.is_voter") : t("cluster.is_learner"))}</td><td>${esc(n.lag ?? "–")}</td></tr>`).join("");
    $("ledger").innerHTML = [
      ["ledger.records", stats.last_index], ["ledger.stored", stats.records_stored], ["ledger.acked", clearing.acked_through],
      ["ledger.backlog", clearing.backlog],
      ["ledger.lag", clearing.lag_ms == null ? t("ledger.lag_leader_only") : dur(clearing.lag_ms)],
      ["ledger.last_success", clearing.last_success_ms ? fmtTime(clearing.last_success_ms) : t("never")],
      ["ledger.last_error", clearing.last_error || "–"],
      ["ledger.gaps", stats.sequence_gaps], ["ledger.conflicts", stats.key_conflicts],
    ].map(([k, v]) => `<tr><th>${esc(t(k))}</th><td>${esc(v)}</td></tr>`).join("");
    // The lag alarm: records waiting with nothing acknowledged for clearing.lag_alarm_secs.
    $("clearing-alarm").classList.toggle("hidden", !clearing.lag_alarm);
    $("clearing-alarm").textContent = clearing.lag_alarm
      ? t("ledger.lag_alarm", { n: clearing.backlog, lag: dur(clearing.lag_ms), after: dur(clearing.lag_alarm_secs * 1000) })
      : "";
    // Sequence gaps (numbers a gate lost) and key conflicts (a record refused): engineers look.
    const ledgerAlarm = stats.sequence_gaps > 0 || stats.key_conflicts > 0;
    $("ledger-alarm").classList.toggle("hidden", !ledgerAlarm);
    $("ledger-alarm").textContent = ledgerAlarm
      ? t("ledger.alarm", { gaps: stats.sequence_gaps, conflicts: stats.key_conflicts })
      : "";
    $("params").innerHTML = params.map((p) => {
      const drifting = gates.filter((g) => g.drift.includes(p.kind)).length;
      const r = rollouts.rollouts[p.kind], q = rollouts.requests[p.kind];
      let ro = "–";
      if (q) ro = t("ro.requested", { v: q.to_version }) + (q.confirmation && !q.confirmation.confirmed_by ? " " + t("ro.needs_second") : "");
      else if (r) ro = `v${r.to_version} ${tn("stage", r.stage.stage)}${r.canaries.length ? " " + t("ro.canaries", { gates: r.canaries.join(", ") }) : ""}${r.stage.reason ? " (" + r.stage.reason.cause + ")" : ""}${r.republished_as ? " → v" + r.republished_as : ""}`;
      const abortable = r && r.stage.stage !== "rolled_back";
      const abort = abortable ? `<button class="ro-abort" data-kind="${esc(p.kind)}">${esc(r.stage.stage === "done" ? t("ro.rollback") : t("ro.abort"))}</button>` : "";
      return `<tr><td>${esc(tn("kind", p.kind))}</td><td>${esc(p.current || "–")}</td><td>${esc(p.versions.join(", "))}</td><td>${drifting}</td><td class="rollout">${esc(ro)}</td><td>${abort}</td></tr>`;
    }).join("");
  }

  async function refresh() {
    try {
      const [mode, gates, cluster, stats, clearing, params, audit, rollouts, flow] = await Promise.all([
        api("GET", "/api/v1/mode"), api("GET", "/api/v1/gates"), api("GET", "/api/v1/cluster"),
        api("GET", "/api/v1/ledger/stats"), api("GET", "/api/v1/clearing"), api("GET", "/api/v1/parameters"),
        api("GET", auditPath()), api("GET", "/api/v1/rollouts"),
        // A busy ledger (every scan slot taken: 503) keeps the last chart rather than failing the board.
        api("GET", `/api/v1/flow?minutes=${FLOW_MINUTES}`).catch((e) => {
          if (e.status === 503 && data && data.flow) return data.flow;
          throw e;
        }),
      ]);
      data = { mode, gates, cluster, stats, clearing, params, audit, rollouts, flow };
      render();
      $("error").textContent = "";
    } catch (e) {
      if (e.status === 401) { logout(t("login.refused")); return; }
      $("error").textContent = t("err.update", { msg: e.message });
    }
  }

  async function login() {
    token = $("token").value.trim();
    try {
      await api("GET", "/api/v1/mode");
    } catch (e) {
      $("login-error").textContent = e.status === 401 ? t("login.unknown") : e.message;
      return;
    }
    sessionStorage.setItem("afc-token", token);
    start();
  }

  function start() {
    $("login-box").classList.add("hidden");
    $("app").classList.remove("hidden");
    $("logout").classList.remove("hidden");
    refresh();
    timer = setInterval(refresh, 2000);
  }

  function logout(why) {
    clearInterval(timer);
    token = "";
    data = null;
    sessionStorage.removeItem("afc-token");
    $("app").classList.add("hidden");
    $("logout").classList.add("hidden");
    $("login-box").classList.remove("hidden");
    $("login-error").textContent = why || "";
  }

  function openEmergencyDialog() {
    const active = data && data.mode.emergency_release;
    $("er-title").textContent = active ? t("er.title_clear") : t("er.title_set");
    $("er-dialog").classList.remove("hidden");
    $("er-confirm").checked = false;
    $("er-error").textContent = "";
  }

  async function search_(more) {
    if (!more) search = { next: null, entries: [], scanned: 0, error: null, done: false };
    const q = new URLSearchParams();
    const card = $("ls-card").value.trim(), gate = $("ls-gate").value.trim(), media = $("ls-media").value;
    const since = $("ls-since").value, until = $("ls-until").value;
    if (card) q.set("card", card);
    if (gate) q.set("gate", gate);
    if (media) q.set("media", media);
    if (since) q.set("since_ms", new Date(since).getTime());
    if (until) q.set("until_ms", new Date(until).getTime());
    if (more && search.next != null) q.set("from", search.next);
    q.set("limit", "50");
    try {
      const page = await api("GET", "/api/v1/ledger/search?" + q.toString());
      search.entries = search.entries.concat(page.entries);
      search.next = page.next_from;
      search.scanned += page.scanned;
      search.error = null;
    } catch (e) {
      search.error = e.status === 503 ? t("err.busy") : e.message;
    }
    search.done = true;
    renderSearch();
  }

  // The range of the reports panel: `from`..`to` (one day when `to` is empty).
  function reportRange() {
    const from = $("rep-from").value, to = $("rep-to").value || from;
    return from ? { from, to } : null;
  }

  function reportQuery(r) {
    return r.from === r.to ? `day=${r.from}` : `from=${r.from}&to=${r.to}`;
  }

  // Loads the four reports of the range, and the day's close (or its preview) for one day.
  async function loadReports() {
    const r = reportRange();
    if (!r) { $("rep-error").textContent = t("rep.pick_day"); return; }
    $("rep-error").textContent = "";
    try {
      const q = reportQuery(r);
      const [flow, revenue, rejects, incidents] = await Promise.all(
        ["flow", "revenue", "rejects", "incidents"].map((k) => api("GET", `/api/v1/reports/${k}?${q}`)));
      const day = r.from === r.to ? await api("GET", `/api/v1/days/${r.from}`) : null;
      reports = { range: r, flow, revenue, rejects, incidents, day };
    } catch (e) {
      $("rep-error").textContent = e.status === 503 ? t("err.busy") : e.message;
    }
    renderReports();
  }

  // Passenger flow of the range by local hour (all gates, all days), entries beside exits.
  function renderReportFlow(rows) {
    const svg = $("rep-flow-chart");
    const H = 180, L = 34, R = 8, T = 8, B = 20;
    const { W, el } = svgCanvas(svg, H);
    const by = { entry: new Array(24).fill(0), exit: new Array(24).fill(0) };
    for (const row of rows) if (by[row.direction]) by[row.direction][row.hour] += row.taps;
    const max = Math.max(1, ...by.entry, ...by.exit);
    const slot = (W - L - R) / 24, bw = Math.max(1, slot / 2 - 1);
    const y = (v) => T + (H - T - B) * (1 - v / max);
    for (const v of [0, Math.round(max / 2), max]) {
      el("line", { class: v ? "grid" : "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) });
      el("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, String(v));
    }
    for (let h = 0; h < 24; h++) {
      const x0 = L + h * slot;
      el("rect", { class: "bar entries", x: x0.toFixed(1), y: y(by.entry[h]).toFixed(1), width: bw.toFixed(1), height: (y(0) - y(by.entry[h])).toFixed(1) });
      el("rect", { class: "bar exits", x: (x0 + bw + 1).toFixed(1), y: y(by.exit[h]).toFixed(1), width: bw.toFixed(1), height: (y(0) - y(by.exit[h])).toFixed(1) });
      if (h % 3 === 0) el("text", { x: x0.toFixed(1), y: H - 5 }, String(h).padStart(2, "0"));
    }
    svg.dataset.entries = by.entry.join(",");
    svg.dataset.exits = by.exit.join(",");
    el("title", {}, t("rep.flow"));
  }

  function renderReports() {
    if (!reports) return;
    const { flow, revenue, rejects, incidents, day } = reports;
    const none = `<tr><td>${esc(t("rep.none"))}</td></tr>`;
    $("rep-day").classList.toggle("hidden", !day);
    if (day) {
      const c = day.close;
      $("rep-day-status").textContent = day.closed
        ? t("rep.status_closed", { day: day.day, by: c.closed_by, at: fmtTime(c.closed_at), up: t(day.uploaded ? "rep.uploaded" : "rep.not_uploaded"), n: day.discrepancies })
        : t("rep.status_open", { day: day.day, n: day.discrepancies });
      $("rep-day-status").classList.toggle("alarm", day.alarm);
      $("rep-close-box").classList.toggle("hidden", day.closed);
      const bad = new Set(c.discrepancies.map((d) => d.gate + "/" + d.direction));
      $("rep-recon").innerHTML = c.reconciliation.map((d) => `<tr class="${bad.has(d.gate + "/" + d.direction) ? "alarm" : ""}"><td>${esc(d.gate)}</td><td>${esc(tn("dir", d.direction))}</td><td>${esc(d.plc_passages ?? "–")}</td><td>${esc(d.recorded_taps)}</td><td>${esc(d.difference ?? "–")}</td><td>${esc(d.tailgating ?? "–")}</td><td>${esc(d.forced_passage ?? "–")}</td></tr>`).join("") || none;
    }
    renderReportFlow(flow.rows);
    $("rep-revenue").innerHTML = revenue.rows.map((r) => `<tr><td>${esc(tn("media", r.media))}</td><td>${esc(tn("reason", r.product))}</td><td>${esc(r.taps)}</td><td>${esc((r.revenue_fen / 100).toFixed(2))}</td></tr>`).join("") || none;
    $("rep-rejects").innerHTML = rejects.rows.map((r) => `<tr><td>${esc(r.day)}</td><td>${esc(tn("reason", r.reason))}</td><td>${esc(r.count)}</td></tr>`).join("") || none;
    $("rep-incidents").innerHTML = incidents.rows.map((r) => `<tr><td>${esc(r.day)}</td><td>${esc(r.gate)}</td><td>${esc(r.tailgating ?? "–")}</td><td>${esc(r.forced_passage ?? "–")}</td></tr>`).join("") || none;
  }

  // A report as CSV, fetched with the token and saved as a file.
  async function downloadCsv(kind) {
    const r = reportRange();
    if (!r) { $("rep-error").textContent = t("rep.pick_day"); return; }
    try {
      const resp = await fetch(`/api/v1/reports/${kind}?${reportQuery(r)}&format=csv`, { headers: { Authorization: "Bearer " + token } });
      if (!resp.ok) throw new Error((await resp.json().catch(() => ({}))).message || resp.statusText);
      const a = document.createElement("a");
      a.href = URL.createObjectURL(await resp.blob());
      a.download = `${kind}_${r.from}_${r.to}.csv`;
      document.body.appendChild(a);
      a.click();
      a.remove();
    } catch (e) {
      $("rep-error").textContent = e.message;
    }
  }

  $("rep-go").onclick = loadReports;
  $("reports-panel").onclick = (ev) => {
    const b = ev.target.closest(".rep-csv");
    if (b) downloadCsv(b.dataset.report);
  };
  $("rep-close").onclick = async () => {
    const r = reportRange(), reason = $("rep-close-reason").value.trim();
    if (!r) { $("rep-error").textContent = t("rep.pick_day"); return; }
    if (!reason) { $("rep-error").textContent = t("err.need_reason"); return; }
    try {
      await api("POST", `/api/v1/days/${r.from}/close`, { reason });
      $("rep-close-reason").value = "";
      $("rep-error").textContent = t("rep.closed_ok");
      loadReports();
    } catch (e) {
      $("rep-error").textContent = e.status === 403 ? t("err.role_close") : e.message;
    }
  };
  // Yesterday's business day by default (the day most likely to be closed next).
  $("rep-from").value = new Date(Date.now() - 86400000 - new Date().getTimezoneOffset() * 60000).toISOString().slice(0, 10);

  $("lang").onchange = () => {
    lang = I18N[$("lang").value] ? $("lang").value : "en";
    localStorage.setItem("afc-lang", lang);
    applyLang();
  };
  $("login").onclick = login;
  $("token").onkeydown = (e) => { if (e.key === "Enter") login(); };
  $("logout").onclick = () => logout();
  $("er-open").onclick = openEmergencyDialog;
  $("er-cancel").onclick = () => $("er-dialog").classList.add("hidden");
  $("er-submit").onclick = async () => {
    const reason = $("er-reason").value.trim();
    if (!$("er-confirm").checked) { $("er-error").textContent = t("er.need_confirm"); return; }
    if (!reason) { $("er-error").textContent = t("err.need_reason"); return; }
    try {
      await api("POST", "/api/v1/mode/emergency-release", { active: !(data && data.mode.emergency_release), confirm: true, reason });
      $("er-dialog").classList.add("hidden");
      $("er-reason").value = "";
      refresh();
    } catch (e) {
      $("er-error").textContent = e.status === 403 ? t("err.role_mode") : e.message;
    }
  };
  // A mode bit set or cleared with the reason typed above; every other bit stays as it is.
  // Emergency release goes only through its guarded dialog.
  $("mode-bits").onclick = async (ev) => {
    if (ev.target.closest(".mode-er-open")) { openEmergencyDialog(); return; }
    const b = ev.target.closest(".mode-toggle");
    if (!b || !data) return;
    const reason = $("mode-reason").value.trim();
    if (!reason) { $("mode-error").textContent = t("err.need_reason"); return; }
    const bit = b.dataset.bit;
    const held = data.mode.names.filter((n) => n !== "normal");
    const names = held.includes(bit) ? held.filter((n) => n !== bit) : held.concat([bit]);
    try {
      await api("PUT", "/api/v1/mode", { names: names.length ? names : ["normal"], reason });
      $("mode-error").textContent = "";
      $("mode-reason").value = "";
      refresh();
    } catch (e) {
      $("mode-error").textContent = e.status === 403 ? t("err.role_mode") : e.message;
    }
  };
  $("gates").onclick = (ev) => {
    const g = ev.target.closest(".gate");
    if (!g) return;
    selected = g.dataset.gate;
    render();
  };
  $("gd-close").onclick = () => { selected = null; render(); };
  $("cmd-kind").onchange = () => $("cmd-direction").classList.toggle("hidden", $("cmd-kind").value !== "set_direction");
  $("cmd-send").onclick = async () => {
    const gate = selected, command = $("cmd-kind").value, reason = $("cmd-reason").value.trim();
    if (!gate) return;
    if (!reason) { cmdAnswer = { gate, ok: false, error: t("err.need_reason") }; render(); return; }
    const body = { command, reason };
    if (command === "set_direction") body.direction = $("cmd-direction").value;
    cmdAnswer = { gate, ok: false, error: t("cmd.waiting") };
    render();
    try {
      const a = await api("POST", `/api/v1/gates/${encodeURIComponent(gate)}/commands`, body);
      cmdAnswer = { gate, ok: true, command: a.command, result: a.result, id: a.id };
    } catch (e) {
      const key = { 403: "err.role_command", 409: "cmd.rejected", 502: "cmd.failed", 504: "cmd.timeout" }[e.status];
      cmdAnswer = { gate, ok: false, error: key ? t(key, { msg: e.message }) : e.message };
    }
    refresh();
  };
  $("ls-go").onclick = () => search_(false);
  $("ls-more").onclick = () => search_(true);
  // Typing waits for a pause, then asks the server again.
  let auditTyping = null;
  const auditFilter = () => {
    clearTimeout(auditTyping);
    auditTyping = setTimeout(async () => {
      try {
        const lines = await api("GET", auditPath());
        if (data) { data.audit = lines; renderAudit(lines); }
      } catch (e) {
        $("error").textContent = t("err.update", { msg: e.message });
      }
    }, 300);
  };
  $("audit-actor").oninput = auditFilter;
  $("audit-action").oninput = auditFilter;
  $("ro-start").onclick = async () => {
    const kind = $("ro-kind").value, version = Number($("ro-version").value), reason = $("ro-reason").value.trim();
    if (!version || !reason) { $("ro-error").textContent = t("err.need_version"); return; }
    try {
      await api("POST", "/api/v1/rollouts", { kind, version, reason });
      $("ro-error").textContent = "";
      refresh();
    } catch (e) {
      $("ro-error").textContent = e.status === 403 ? t("err.role_rollout") : e.message;
    }
  };
  // Abort (or roll back a finished rollout): every gate returns to the previous content.
  $("params").onclick = async (ev) => {
    const b = ev.target.closest(".ro-abort");
    if (!b) return;
    const kind = b.dataset.kind;
    const reason = prompt(t("ro.prompt", { kind: tn("kind", kind) }));
    if (!reason || !reason.trim()) return;
    try {
      await api("POST", `/api/v1/rollouts/${kind}/abort`, { reason: reason.trim() });
      refresh();
    } catch (e) {
      $("ro-error").textContent = e.status === 403 ? t("err.role_rollout") : e.message;
    }
  };
  applyLang();
  if (token) start();
})();
