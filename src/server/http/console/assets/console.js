// Hangar console: forms to the JSON API (with the session's CSRF token), upload progress, and
// live regions refreshed from the event stream. No dependencies; served by the appliance itself.
"use strict";
(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  const list = (s) => s.split(/[\s,]+/).filter(Boolean);
  let csrf = null;

  function toast(text, bad) {
    const t = $("#toast");
    if (!t) return;
    t.textContent = text;
    t.className = bad ? "show bad" : "show";
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.className = ""; }, bad ? 8000 : 3000);
  }

  async function session() {
    if (csrf !== null) return csrf;
    const r = await fetch("/api/auth/session", { credentials: "same-origin" });
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search); return ""; }
    const j = await r.json();
    csrf = (j.data && j.data.csrfToken) || "";
    return csrf;
  }

  // A JSON API call; resolves to the envelope's data, rejects with its message.
  async function api(method, url, body) {
    const headers = { "X-CSRF-Token": await session() };
    const init = { method, headers, credentials: "same-origin" };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const r = await fetch(url, init);
    let j = null;
    try { j = await r.json(); } catch (e) { /* not JSON */ }
    if (!r.ok || !j || j.status === false) {
      const msg = (j && j.message) || ("HTTP " + r.status);
      const err = new Error(msg);
      err.status = r.status;
      throw err;
    }
    return j.data;
  }

  // ---- live regions -------------------------------------------------------------------
  let busy = false, again = false;
  async function refresh() {
    const live = $("#live");
    if (!live) return;
    if (busy) { again = true; return; }
    busy = true;
    try {
      const u = new URL(location.href);
      u.searchParams.set("live", "1");
      const r = await fetch(u, { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (r.ok) {
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        const fresh = doc.getElementById("live");
        const open = new Set($$("details[open] summary", live).map((s) => s.textContent));
        if (fresh) {
          live.replaceChildren(...fresh.childNodes);
          $$("details summary", live).forEach((s) => { if (open.has(s.textContent)) s.parentElement.open = true; });
          live.dispatchEvent(new CustomEvent("refreshed", { bubbles: true }));
        }
      }
    } catch (e) { /* next event retries */ }
    busy = false;
    if (again) { again = false; setTimeout(refresh, 250); }
  }

  function relevant(watch, d) {
    if (!watch) return false;
    const [kind, id] = [watch.split(":")[0], watch.slice(watch.indexOf(":") + 1)];
    const tasks = d.tasks || [];
    switch (kind) {
      case "fleet": return tasks.length > 0 || (d.devices || []).length > 0 || d.firmware || d.deltas;
      case "device": return tasks.some((t) => t.deviceId === id) || (d.devices || []).includes(id);
      case "firmware": return d.firmware || d.deltas;
      case "campaigns": return (d.campaigns || []).length > 0;
      case "campaign": return (d.campaigns || []).includes(id);
      default: return false;
    }
  }

  function follow() {
    const watch = document.body.dataset.watch;
    const dot = $("#live-state");
    if (watch && watch.startsWith("every:")) {
      // figures that change all the time (the broker's): refreshed on a timer while visible
      const ms = Math.max(1000, Number(watch.slice(6)) || 2000);
      if (dot) dot.className = "on";
      setInterval(() => { if (!document.hidden) refresh(); }, ms);
      return;
    }
    if (!watch || !window.EventSource) return;
    const es = new EventSource("/api/events");
    es.addEventListener("hello", () => { if (dot) dot.className = "on"; });
    es.addEventListener("changes", (ev) => {
      if (dot) dot.className = "on";
      let d = {};
      try { d = JSON.parse(ev.data); } catch (e) { return; }
      if (relevant(watch, d)) refresh();
    });
    es.addEventListener("resync", () => refresh());
    es.onerror = () => { if (dot) dot.className = "off"; };
  }

  // ---- actions --------------------------------------------------------------------------
  document.addEventListener("click", async (ev) => {
    const b = ev.target.closest("button.act[data-post]");
    if (b) {
      ev.preventDefault();
      if (b.dataset.confirm && !confirm(b.dataset.confirm)) return;
      b.disabled = true;
      try {
        const body = b.dataset.body ? JSON.parse(b.dataset.body) : undefined;
        await api(b.dataset.method || "POST", b.dataset.post, body);
        toast(b.textContent.trim() + ": done");
        refresh();
      } catch (e) { toast(e.message, true); }
      b.disabled = false;
      return;
    }
    if (ev.target.id === "logout") {
      try { await api("POST", "/api/auth/logout"); } catch (e) { /* signed out anyway */ }
      location.href = "/login";
    }
    if (ev.target.id === "cancel-task") {
      if (!confirm("Cancel this device's task?")) return;
      try { await api("POST", "/api/ota/task/" + encodeURIComponent(ev.target.dataset.device) + "/cancel"); toast("cancelled"); refresh(); }
      catch (e) { toast(e.message, true); }
    }
  });

  function on(sel, handler) {
    const f = $(sel);
    if (f) f.addEventListener("submit", (ev) => { ev.preventDefault(); handler(f); });
  }

  // sign-in
  on("#login-form", async (f) => {
    const err = $("#login-error");
    err.textContent = "";
    const r = await fetch("/api/auth/login", {
      method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username: f.username.value, password: f.password.value }),
    });
    let j = null;
    try { j = await r.json(); } catch (e) { /* not JSON */ }
    if (r.ok) {
      // the appliance checked `next` (a path of its own) when it served this page; check again
      // the way the browser will resolve it, and go nowhere else
      let to = "/";
      try {
        const u = new URL(f.dataset.next || "/", location.origin);
        if (u.origin === location.origin) to = u.pathname + u.search;
      } catch (e) { /* stay with "/" */ }
      location.href = to;
    } else {
      err.textContent = (j && j.message) || ("HTTP " + r.status);
    }
  });

  // upload with a progress bar: the fields first, the image last, streamed by the browser
  on("#upload-form", async (f) => {
    const bar = $("#upload-progress"), state = $("#upload-state");
    const file = f.file.files[0];
    if (!file) return;
    const fd = new FormData();
    fd.append("version", f.version.value);
    fd.append("deviceType", f.deviceType.value || "gateway");
    fd.append("description", f.description.value);
    fd.append("forceUpgrade", f.forceUpgrade.checked ? "true" : "false");
    // the signature goes before the image, so the appliance checks it while the image streams
    const sig = f.signature && f.signature.files[0];
    if (sig) fd.append("signature", await sig.text());
    fd.append("file", file, file.name);
    const token = await session();
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/ota/firmware/upload");
    xhr.setRequestHeader("X-CSRF-Token", token);
    bar.hidden = false; bar.value = 0;
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) {
        bar.value = (100 * e.loaded) / e.total;
        state.textContent = Math.floor(bar.value) + " % (" + e.loaded + " of " + e.total + " bytes)";
      }
    };
    xhr.onload = () => {
      let j = null;
      try { j = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status === 201) {
        bar.value = 100;
        state.textContent = "uploaded " + j.data.version + " (sha256 " + j.data.sha256.slice(0, 12) + "…)";
        toast("uploaded " + j.data.version);
        f.reset();
        refresh();
      } else {
        state.textContent = (j && j.message) || ("HTTP " + xhr.status);
        toast(state.textContent, true);
      }
    };
    xhr.onerror = () => { state.textContent = "the upload was interrupted"; toast(state.textContent, true); };
    state.textContent = "uploading…";
    xhr.send(fd);
  });

  on("#upgrade-form", async (f) => {
    try {
      await api("POST", "/api/ota/upgrade/" + encodeURIComponent(f.dataset.device), { version: f.version.value, force: f.force.checked });
      toast("upgrade to " + f.version.value + " sent");
      refresh();
    } catch (e) { toast(e.message, true); }
  });

  document.addEventListener("submit", async (ev) => {
    const f = ev.target.closest("form.delta-form");
    if (!f) return;
    ev.preventDefault();
    try { await api("POST", f.dataset.url, { fromVersion: f.fromVersion.value }); toast("delta requested"); refresh(); }
    catch (e) { toast(e.message, true); }
  });

  document.addEventListener("submit", async (ev) => {
    const f = ev.target.closest("form.user-change");
    if (!f) return;
    ev.preventDefault();
    const body = { role: f.role.value };
    if (f.password.value) body.password = f.password.value;
    try {
      await api("PATCH", "/api/users/" + encodeURIComponent(f.dataset.user), body);
      toast(f.dataset.user + ": changed" + (body.password ? " (signed out everywhere)" : ""));
      f.password.value = "";
      refresh();
    } catch (e) { toast(e.message, true); }
  });

  on("#user-form", async (f) => {
    try {
      await api("POST", "/api/users", { name: f.name.value, role: f.role.value, password: f.password.value });
      toast("user " + f.name.value + " added"); f.reset(); refresh();
    } catch (e) { toast(e.message, true); }
  });

  // forms that are one API call: their fields as a JSON body (a field with data-list is a
  // comma- or space-separated list; an empty field is left out)
  document.addEventListener("submit", async (ev) => {
    const f = ev.target.closest("form.api-form");
    if (!f) return;
    ev.preventDefault();
    const body = {};
    for (const e of f.elements) {
      if (!e.name) continue;
      if (e.type === "checkbox") body[e.name] = e.checked;
      else if (e.dataset.list !== undefined) { const l = list(e.value); if (l.length) body[e.name] = l; }
      else if (e.value !== "") body[e.name] = e.value;
    }
    try {
      await api(f.dataset.method || "POST", f.dataset.url, body);
      toast(f.dataset.done || "done"); f.reset(); refresh();
    } catch (e) { toast(e.message, true); }
  });

  // ---- campaign form and its dry run ----------------------------------------------------
  function campaignBody(f) {
    const [deviceType, version] = (f.firmware.value || "|").split("|");
    const kind = f.targetKind.value;
    const targets = kind === "all" ? { all: true }
      : kind === "ids" ? { deviceIds: list(f.deviceIds.value) }
      : { fromVersions: list(f.fromVersions.value), tags: list(f.tags.value) };
    return {
      name: f.name.value || "(unnamed)", deviceType, version, targets,
      waves: list(f.waves.value).map(Number),
      successThreshold: Number(f.successThreshold.value),
      failureThreshold: { percent: Number(f.failurePercent.value), minCount: Number(f.failureMin.value) },
      maxInFlight: Number(f.maxInFlight.value), retries: Number(f.retries.value),
      dynamic: f.dynamic.checked, force: f.force.checked,
      ...when(f),
    };
  }

  // the start time (the browser's local time, sent with its offset) and the daily window
  function when(f) {
    const out = {};
    if (f.startAt && f.startAt.value) {
      const d = new Date(f.startAt.value);
      if (!isNaN(d)) out.startAt = d.toISOString();
    }
    if (f.windowStart && f.windowStart.value) {
      out.window = { start: f.windowStart.value, durationMinutes: Number(f.windowMinutes.value || 180) };
    }
    return out;
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function showPlan(box, plan) {
    const out = [el("h2", "Dry run"), el("p", plan.total + " devices in " + plan.waves.length + " waves")];
    plan.waves.forEach((w, i) => {
      const bytes = w.estimatedBytes >= 1e6 ? (w.estimatedBytes / 1e6).toFixed(1) + " MB" : w.estimatedBytes + " B";
      const d = el("details", undefined, "wave-plan");
      d.append(el("summary", "wave " + (i + 1) + " (up to " + w.percent + " %): " + w.devices.length + " devices, "
        + w.deltas + " by delta, " + bytes + ", " + w.offline + " offline"));
      const ul = el("ul", undefined, "devices");
      w.devices.slice(0, 200).forEach((dev) => {
        ul.append(el("li", dev.id + " " + (dev.firmwareVersion || "?") + (dev.delta ? " (delta)" : "") + (dev.online ? "" : " — offline")));
      });
      if (w.devices.length > 200) ul.append(el("li", "… and " + (w.devices.length - 200) + " more"));
      d.append(ul);
      out.push(d);
    });
    if (plan.conflicts.length) {
      out.push(el("h3", plan.conflicts.length + " left out"));
      const ul = el("ul");
      plan.conflicts.slice(0, 100).forEach((c) => ul.append(el("li", c.deviceId + ": " + c.reason)));
      out.push(ul);
    }
    plan.notes.forEach((n) => out.push(el("p", n, "muted")));
    box.replaceChildren(...out);
  }

  const cf = $("#campaign-form");
  if (cf) {
    let timer = null;
    const dry = async () => {
      const box = $("#dry-run");
      try { showPlan(box, await api("POST", "/api/ota/campaigns/dry-run", campaignBody(cf))); $("#campaign-error").textContent = ""; }
      catch (e) { box.replaceChildren(el("h2", "Dry run"), el("p", e.message, "error")); }
    };
    cf.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(dry, 300); });
    cf.addEventListener("change", () => { clearTimeout(timer); timer = setTimeout(dry, 100); });
    dry();
    on("#campaign-form", async (f) => {
      try {
        const c = await api("POST", "/api/ota/campaigns", campaignBody(f));
        location.href = "/campaigns/" + encodeURIComponent(c.id);
      } catch (e) { $("#campaign-error").textContent = e.message; }
    });
  }

  follow();
})();
