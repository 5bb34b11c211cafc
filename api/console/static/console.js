// The Steer console: one Alpine.js component over the JSON API. The key lives in this tab's
// sessionStorage and is sent as a Bearer token; the API decides what it may see.
"use strict";

const KEY_SLOT = "steer.console.key";
const POLL_MS = 1000;
let lossChart = null; // a Chart.js instance: kept out of Alpine's reactive state on purpose

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  if (parts[0] === "users" && parts[1]) return { view: "user", id: decodeURIComponent(parts[1]) };
  if (parts[0] === "jobs" && parts[1]) return { view: "job", id: decodeURIComponent(parts[1]) };
  if (["users", "jobs", "system"].includes(parts[0])) return { view: parts[0], id: null };
  return { view: "", id: null };
}

// Prometheus text format: unlabelled samples by name, labelled ones as {name: {labelvalue: v}}.
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const value = Number(m[4]);
    if (!m[3]) { out[m[1]] = value; continue; }
    const label = (m[3].match(/="([^"]*)"/) || [])[1] || m[3];
    if (typeof out[m[1]] !== "object") out[m[1]] = {};
    out[m[1]][label] = value;
  }
  return out;
}

document.addEventListener("alpine:init", () => {
  Alpine.data("steerConsole", () => ({
    key: sessionStorage.getItem(KEY_SLOT),
    keyInput: "",
    session: null,
    error: "",
    route: parseRoute(),
    users: [], usersTruncated: false, userQuery: "", sampleCounts: {},
    user: null, versions: [], samples: [], samplesMore: false, userJobs: [],
    tryPrompt: "Write me a short note about the weekend.", tryResult: null, trying: false,
    jobs: [], job: null, events: [], lossPoints: 0,
    system: { ready: "", checks: {}, capacity: {}, metrics: {}, jobs: {}, workers: null },
    timer: null,

    get isAdmin() { return this.session && this.session.role === "admin"; },

    async start() {
      window.addEventListener("hashchange", () => { this.route = parseRoute(); this.show(); });
      if (this.key) await this.checkKey(this.key);
    },

    async login() {
      await this.checkKey(this.keyInput.trim());
      this.keyInput = "";
    },

    async checkKey(key) {
      this.error = "";
      const r = await fetch("/console/api/session", { headers: { Authorization: "Bearer " + key } });
      if (!r.ok) {
        sessionStorage.removeItem(KEY_SLOT);
        this.key = null; this.session = null;
        this.error = r.status === 401 ? "That key is not valid." : "Login failed (" + r.status + ").";
        return;
      }
      this.key = key;
      sessionStorage.setItem(KEY_SLOT, key);
      this.session = await r.json();
      if (!this.route.view) location.hash = this.isAdmin ? "#/users" : "#/users/" + this.session.user_id;
      else this.show();
    },

    logout() {
      sessionStorage.removeItem(KEY_SLOT);
      this.key = null; this.session = null; this.stopPolling();
      location.hash = "";
    },

    async api(path, options = {}) {
      const r = await fetch(path, {
        ...options,
        headers: { Authorization: "Bearer " + this.key, "Content-Type": "application/json", ...(options.headers || {}) },
      });
      if (r.status === 401) { this.logout(); throw new Error("the key is no longer valid"); }
      const body = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
      if (!r.ok) throw new Error((body && body.error && body.error.message) || r.status + " " + path);
      return body;
    },

    async guard(work) {
      try { this.error = ""; await work(); } catch (e) { this.error = e.message; }
    },

    // One polling loop at a time: a loop whose generation is not the current one ends itself
    // (a tick may be awaiting the API when the page changes).
    pollGeneration: 0,

    stopPolling() {
      this.pollGeneration++;
      if (this.timer) { clearTimeout(this.timer); this.timer = null; }
    },

    poll(work) {
      this.stopPolling();
      const generation = this.pollGeneration;
      const tick = async () => {
        if (generation !== this.pollGeneration) return;
        const more = await work();
        if (more !== false && generation === this.pollGeneration) this.timer = setTimeout(tick, POLL_MS);
      };
      this.timer = setTimeout(tick, POLL_MS);
    },

    async show() {
      if (!this.session) return;
      this.stopPolling();
      const { view, id } = this.route;
      if (view === "users") await this.guard(() => this.loadUsers());
      else if (view === "user") await this.guard(() => this.loadUser(id));
      else if (view === "jobs") { await this.guard(() => this.loadJobs()); this.poll(() => this.loadJobs().then(() => true, () => true)); }
      else if (view === "job") { this.job = null; this.events = []; await this.guard(() => this.loadJob(id)); this.pollJob(id); }
      else if (view === "system") { await this.guard(() => this.loadSystem()); this.poll(() => this.loadSystem().then(() => true, () => true)); }
    },

    // --- users ---------------------------------------------------------------------------
    async loadUsers() {
      let all = [], after = null, more = true;
      for (let page = 0; more && page < 10; page++) {
        const body = await this.api("/v1/users?limit=100" + (after ? "&after=" + encodeURIComponent(after) : ""));
        all = all.concat(body.data); more = body.has_more; after = all.length ? all[all.length - 1].id : null;
      }
      this.users = all; this.usersTruncated = more;
      for (const u of all) {
        if (this.sampleCounts[u.id] !== undefined) continue;
        this.api("/v1/users/" + u.id + "/samples?limit=100")
          .then((b) => { this.sampleCounts[u.id] = b.data.length + (b.has_more ? "+" : ""); }, () => {});
      }
    },

    filteredUsers() {
      const q = this.userQuery.trim().toLowerCase();
      return q ? this.users.filter((u) => u.external_id.toLowerCase().includes(q) || u.id.includes(q)) : this.users;
    },

    async loadUser(id) {
      if (!this.user || this.user.id !== id) { this.user = null; this.tryResult = null; }
      const [user, versions, samples, jobs] = await Promise.all([
        this.api("/v1/users/" + id),
        this.api("/v1/users/" + id + "/prefixes"),
        this.api("/v1/users/" + id + "/samples?limit=100"),
        this.api("/v1/fine_tuning/jobs?limit=20&user=" + encodeURIComponent(id)),
      ]);
      this.user = user;
      this.versions = versions.data.slice().sort((a, b) => b.version - a.version);
      this.samples = samples.data; this.samplesMore = samples.has_more;
      this.userJobs = jobs.data;
    },

    async activate(version) {
      await this.guard(async () => {
        await this.api("/v1/users/" + this.user.id + "/prefixes/" + version + "/activate", { method: "POST" });
        await this.loadUser(this.user.id);
      });
    },

    async tryIt() {
      this.trying = true;
      await this.guard(async () => {
        const ask = (model) => this.api("/v1/completions", {
          method: "POST",
          body: JSON.stringify({ model, prompt: this.tryPrompt, max_tokens: 40, temperature: 0 }),
        }).then((b) => b.choices[0].text, (e) => "(" + e.message + ")");
        const [base, user] = await Promise.all([ask(this.session.base_model), ask("user:" + this.user.external_id)]);
        this.tryResult = { base, user };
      });
      this.trying = false;
    },

    // --- jobs ----------------------------------------------------------------------------
    async loadJobs() { this.jobs = (await this.api("/v1/fine_tuning/jobs?limit=50")).data; },

    async loadJob(id) {
      const [job, events] = await Promise.all([
        this.api("/v1/fine_tuning/jobs/" + id),
        this.api("/v1/fine_tuning/jobs/" + id + "/events?limit=1000"),
      ]);
      this.job = job; this.events = events.data;
      this.drawLoss(events.data.slice().reverse().filter((e) => e.data && e.data.step !== undefined));
    },

    pollJob(id) {
      this.poll(async () => {
        if (this.route.view !== "job" || this.route.id !== id) return false;
        try { await this.loadJob(id); } catch (e) { this.error = e.message; }
        return this.job && ["queued", "running"].includes(this.job.status);
      });
    },

    async cancelJob() {
      await this.guard(async () => {
        this.job = await this.api("/v1/fine_tuning/jobs/" + this.job.id + "/cancel", { method: "POST" });
        this.pollJob(this.job.id);
      });
    },

    drawLoss(steps) {
      const train = steps.map((e) => ({ x: e.data.step, y: e.data.train_loss }));
      const val = steps.filter((e) => e.data.val_loss !== null && e.data.val_loss !== undefined)
        .map((e) => ({ x: e.data.step, y: e.data.val_loss }));
      this.lossPoints = train.length;
      const canvas = document.getElementById("loss-chart");
      if (!lossChart || lossChart.canvas !== canvas) {
        if (lossChart) lossChart.destroy();
        lossChart = new Chart(canvas, {
          type: "line",
          data: { datasets: [
            { label: "training loss", data: [], borderColor: "#2f6fde", pointRadius: 2, tension: 0.2 },
            { label: "validation loss", data: [], borderColor: "#e07b00", pointRadius: 3, tension: 0.2 },
          ] },
          options: {
            animation: false, maintainAspectRatio: false, parsing: true,
            scales: { x: { type: "linear", title: { display: true, text: "step" } },
                      y: { title: { display: true, text: "loss" } } },
          },
        });
      }
      lossChart.data.datasets[0].data = train;
      lossChart.data.datasets[1].data = val;
      lossChart.update();
    },

    // --- system --------------------------------------------------------------------------
    async loadSystem() {
      const [ready, metricsText] = await Promise.all([
        fetch("/readyz").then((r) => r.json()),
        fetch("/metrics").then((r) => r.text()),
      ]);
      let workers = null;
      try {
        const body = await this.api("/v1/admin/workers");
        workers = Array.isArray(body) ? body : body.data;
      } catch (e) { workers = null; } // older servers have no worker list
      const metrics = parseMetrics(metricsText);
      // Whatever else /readyz reports beside status and checks (inference_workers, ...) is capacity.
      const capacity = {};
      for (const [name, value] of Object.entries(ready)) {
        if (name === "status" || name === "checks") continue;
        capacity[name] = value === null ? "unknown" : typeof value === "object" ? JSON.stringify(value) : String(value);
      }
      this.system = {
        ready: ready.status, checks: ready.checks || {}, capacity,
        metrics, jobs: typeof metrics.steer_jobs === "object" ? metrics.steer_jobs : {}, workers,
      };
    },

    // --- formatting ----------------------------------------------------------------------
    metricText(name) { const v = this.system.metrics[name]; return typeof v === "number" ? String(v) : "–"; },
    num(v, digits = 4) { return typeof v === "number" ? v.toFixed(digits) : "–"; },
    bytes(v) { return typeof v === "number" ? (v / 1024).toFixed(1) + " KiB" : "–"; },
    when(ts) { return ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : ""; },
    versionOf(model) { const m = model && model.match(/:v(\d+)$/); return m ? "v" + m[1] : (model || "none"); },
    samplesText() { return "(" + this.samples.length + (this.samplesMore ? "+, first 100 shown" : "") + ")"; },
    progressText(j) {
      const p = j.progress;
      if (!p || p.step === undefined) return "";
      return "step " + p.step + "/" + p.total_steps + (p.train_loss !== undefined ? ", loss " + p.train_loss.toFixed(4) : "");
    },
  }));
});
