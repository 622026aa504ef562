// pixelvote review desk: plain JS, no dependencies. Talks to /api/* on the same origin.
"use strict";

const $ = (sel) => document.querySelector(sel);
const $$ = (sel) => Array.from(document.querySelectorAll(sel));

const S = {
  meta: null, queue: [], pos: -1, detail: null,
  view: "image", maskMode: "fill", opacity: 0.45, zoom: null, // null: fit
  w: 0, h: 0, mask: null, baseImg: null,
  editing: false, tool: "brush", brush: 12, undo: [], dirty: false, drawing: false, last: null,
  busy: false, loadSeq: 0,
};
const ACTION_MARK = { accept: "✓", reject: "✗", edit: "✎", relabel: "⇄" };
const REASON_TEXT = {
  disagreement: "members disagree", high_mutual_information: "high mutual information",
  high_variance: "high variance", low_confidence: "low confidence", empty_mask: "empty mask",
  no_agreeing_member: "no member agrees", segmenter_disagrees: "segmenter disagrees",
  label_disagrees: "diagnosis differs from the label",
};

// ---------------------------------------------------------------- helpers
function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function fmt(x, d = 2) { return x === null || x === undefined ? "—" : Number(x).toFixed(d); }
function small(x) {
  if (x === null || x === undefined) return "—";
  const v = Number(x);
  return v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : v.toFixed(3);
}
function shortNames(names) {
  // "efficientnet_lite0/1/2" -> "lite0/1/2": drop the shared prefix up to its last separator
  if (names.length < 2) return names;
  let p = names[0];
  for (const n of names) while (!n.startsWith(p)) p = p.slice(0, -1);
  const cut = Math.max(p.lastIndexOf("_"), p.lastIndexOf("-"), p.lastIndexOf("/")) + 1;
  return cut > 0 ? names.map((n) => n.slice(cut) || n) : names;
}
function pct(x) { return x === null || x === undefined ? "—" : (100 * x).toFixed(0) + "%"; }
function keyUrl(key) { return key.split("/").map(encodeURIComponent).join("/"); }
function requestId() {
  const b = new Uint8Array(16); crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
function toast(text, kind = "") {
  const el = document.createElement("div");
  el.className = "toast " + kind; el.textContent = text;
  $("#toasts").appendChild(el);
  setTimeout(() => el.remove(), kind === "err" ? 8000 : 3500);
}
async function api(path, opts = {}) {
  const init = { headers: {}, credentials: "same-origin", ...opts };
  if (opts.json !== undefined) {
    init.method = opts.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.json);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { detail: text }; }
  if (!r.ok) {
    let d = body && body.detail;
    if (Array.isArray(d)) d = d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
    const err = new Error(d || r.statusText); err.status = r.status; throw err;
  }
  return body;
}
function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot load " + url));
    img.src = url;
  });
}
function reviewer() { return $("#reviewer").value.trim() || null; }

// ---------------------------------------------------------------- summary and queue
async function loadSummary() {
  const s = await api("/api/summary");
  $("#p-flagged").textContent = `${s.reviewed_flagged}/${s.flagged}`;
  $("#p-all").textContent = `${s.reviewed}/${s.images}`;
  $("#bar-flagged").style.width = (s.flagged ? (100 * s.reviewed_flagged) / s.flagged : 100) + "%";
  $("#bar-all").style.width = (s.images ? (100 * s.reviewed) / s.images : 0) + "%";
  const a = s.by_action;
  $("#counts").innerHTML =
    `<span><b>${s.images}</b> images</span><span><b>${s.flagged}</b> flagged</span>` +
    `<span><b>${s.images - s.reviewed}</b> to review</span>` +
    ["accept", "reject", "relabel", "edit"].map((k) => `<span>${ACTION_MARK[k]} <b>${a[k] || 0}</b> ${k}</span>`).join("") +
    `<span><b>${s.decisions}</b> decisions</span>`;
}

function filterQuery() {
  const p = new URLSearchParams();
  for (const [id, name] of [["#f-flagged", "flagged"], ["#f-reviewed", "reviewed"], ["#f-label", "label"], ["#f-reason", "reason"]]) {
    const v = $(id).value; if (v) p.set(name, v);
  }
  return p.toString();
}

async function loadQueue(keepKey) {
  const res = await api("/api/images?" + filterQuery());
  S.queue = res.items;
  $("#queue-count").textContent = `${res.total} in queue`;
  renderQueue();
  let pos = keepKey ? S.queue.findIndex((it) => it.key === keepKey) : -1;
  if (pos < 0 && S.queue.length) pos = 0;
  if (pos >= 0) await select(pos); else showEmpty();
}

function renderQueue() {
  const ol = $("#queue");
  ol.innerHTML = "";
  S.queue.forEach((it, i) => {
    const li = document.createElement("li");
    li.dataset.i = i; li.dataset.key = it.key;
    const c = it.current;
    const mark = c.reviewed ? `<span class="qs ${c.action}" title="${esc(c.action)} by ${esc(c.reviewer)}">${ACTION_MARK[c.action]}</span>` : `<span class="qs"></span>`;
    const flag = it.flagged ? `<span class="flag-dot" title="flagged">●</span> ` : "";
    const label = c.reviewed && c.label !== it.label ? `${esc(it.label)} → ${esc(c.label)}` : esc(it.label);
    li.innerHTML = `${mark}<span class="qk" title="${esc(it.key)}">${flag}${esc(it.key)}</span><span class="qp">${pct(it.probability)}</span>` +
      `<span class="qsub">${label}${it.reasons.length ? " · " + it.reasons.map((r) => esc(REASON_TEXT[r] || r)).join(", ") : ""}</span>`;
    li.className = (i === S.pos ? "sel " : "") + (c.reviewed ? "done" : "");
    li.addEventListener("click", () => guardNav(() => select(i)));
    ol.appendChild(li);
  });
}

function markQueueItem(i) {
  const li = $(`#queue li[data-i="${i}"]`);
  $$("#queue li.sel").forEach((el) => el.classList.remove("sel"));
  if (li) { li.classList.add("sel"); li.scrollIntoView({ block: "nearest" }); }
}

function showEmpty() {
  S.pos = -1; S.detail = null;
  $("#empty").hidden = false; $("#stage").hidden = true;
  $("#d-key").textContent = "—"; $("#d-status").textContent = "";
}

// ---------------------------------------------------------------- one image
async function select(i) {
  if (i < 0 || i >= S.queue.length) return;
  S.pos = i;
  markQueueItem(i);
  const key = S.queue[i].key;
  history.replaceState(null, "", "#" + encodeURIComponent(key));
  const seq = ++S.loadSeq;
  const d = await api("/api/images/" + keyUrl(key));
  if (seq !== S.loadSeq) return; // a later selection won
  S.detail = d; S.w = d.width; S.h = d.height;
  $("#empty").hidden = true; $("#stage").hidden = false;
  renderDetail();
  await Promise.all([loadBase(seq), loadMask(d.files.mask, seq)]);
  if (seq === S.loadSeq) { layout(); $("#stage").dataset.ready = key; }
}

function renderDetail() {
  const d = S.detail, c = d.current;
  $("#d-key").textContent = d.key;
  $("#d-status").innerHTML = c.reviewed
    ? `<span class="badge ${c.action}">${ACTION_MARK[c.action]} ${esc(c.action)}</span> → <b>${esc(c.label)}</b> by ${esc(c.reviewer)} <span class="muted">${new Date(c.created).toLocaleString()}</span>`
    : `<span class="badge todo">not reviewed</span>${d.flagged ? ' <span class="flag-dot">● flagged</span>' : ""}`;
  $("#d-pred").innerHTML = `<b>${esc(d.label)}</b> ${pct(d.probability)}` + (d.target_class && d.target_class !== d.label ? ` <span class="muted">(mask of ${esc(d.target_class)})</span>` : "");
  const probs = Object.entries(d.probabilities).sort((a, b) => b[1] - a[1]);
  $("#d-probs").innerHTML = probs.map(([k, v]) => `<span>${esc(k)}</span><div class="pb"><div></div></div><span class="pv">${pct(v)}</span>`).join("");
  // the CSP blocks inline style attributes: widths are set from script
  $$("#d-probs .pb div").forEach((el, j) => { el.style.width = (100 * probs[j][1]).toFixed(1) + "%"; });
  $("#d-reasons").innerHTML = d.reasons.length ? d.reasons.map((r) => `<span class="reason" title="${esc(r)}">${esc(REASON_TEXT[r] || r)}</span>`).join("") : '<span class="muted">not flagged</span>';
  const m = [["uncertainty (mean)", fmt(d.uncertainty_mean, 3)], ["agreement", fmt(d.agreement, 2)],
    ["mask area", d.mask_area === null ? "—" : `${d.mask_area} px (${pct(d.mask_fraction)})`],
    ["threshold", fmt(d.threshold, 2)], ["size", `${d.width} × ${d.height}`], ["file", d.image_name || "—"]];
  $("#d-metrics").innerHTML = m.map(([k, v]) => `<dt>${k}</dt><dd>${esc(v)}</dd>`).join("");
  const rows = Object.entries(d.members), short = shortNames(rows.map((r) => r[0]));
  $("#d-members tbody").innerHTML = rows.length ? rows.map(([name, s], j) =>
    `<tr class="${s.agrees === false ? "disagree" : ""}"><td title="${esc(name)}">${esc(short[j])}</td><td>${esc(s.label)}</td><td>${fmt(s.probability)}</td><td>${fmt(s.entropy)}</td><td>${small(s.mutual_information)}</td><td>${small(s.variance)}</td></tr>`).join("")
    : '<tr><td colspan="6" class="muted">no member details stored</td></tr>';
  const thumbs = [];
  if (d.files.overlay) thumbs.push(["heat", d.files.overlay, "heat map (ensemble)"]);
  if (d.files.uncertainty) thumbs.push(["uncertainty", d.files.uncertainty, "uncertainty"]);
  for (const [name, url] of Object.entries(d.cams)) thumbs.push(["cam:" + name, url, "CAM " + name]);
  $("#d-thumbs").innerHTML = thumbs.map(([v, url, cap]) => `<figure data-view="${esc(v)}"><img src="${esc(url)}" alt="${esc(cap)}"><figcaption>${esc(cap)}</figcaption></figure>`).join("");
  $$("#d-thumbs figure").forEach((f) => f.addEventListener("click", () => setView(f.dataset.view)));
  $("#d-cams-note").textContent = d.cams_note;
  $("#d-history").innerHTML = d.history.length ? d.history.map((h) =>
    `<li><span class="badge ${h.action}">${esc(h.action)}</span> → ${esc(h.label)} · ${esc(h.reviewer)} <span class="when">${new Date(h.created).toLocaleString()}</span> <a href="${h.mask_url}" target="_blank" rel="noopener">mask</a></li>`).join("")
    : '<li class="muted">no decision yet</li>';
  const opts = S.meta.classes.map((c) => `<option value="${esc(c)}">${esc(c)}${c === S.meta.background ? " (no finding)" : ""}</option>`).join("");
  $("#relabel-select").innerHTML = opts;
  const other = S.meta.classes.find((cl) => cl !== c.label) || c.label;
  $("#relabel-select").value = other;
  $("#edit-label").innerHTML = S.meta.foreground.map((cl) => `<option value="${esc(cl)}">${esc(cl)}</option>`).join("");
  $("#edit-label").value = S.meta.foreground.includes(c.label) ? c.label : (S.meta.foreground.includes(d.target_class) ? d.target_class : S.meta.foreground[0]);
  $("#act-reject").disabled = S.meta.background === null;
}

// ---------------------------------------------------------------- drawing the stage
const INFERNO = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]];
function lut(v) {
  const x = (v / 255) * (INFERNO.length - 1), i = Math.min(Math.floor(x), INFERNO.length - 2), t = x - i;
  const a = INFERNO[i], b = INFERNO[i + 1];
  return [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t];
}

async function loadBase(seq) {
  const d = S.detail, canvas = $("#base");
  let url = d.files.image, note = "";
  if (S.view === "heat") url = d.files.overlay;
  else if (S.view === "uncertainty") url = d.files.uncertainty;
  else if (S.view.startsWith("cam:")) url = d.cams[S.view.slice(4)];
  if (!url) { url = d.files.image; note = `no ${S.view} map stored; showing the image`; }
  let img;
  try { img = await loadImage(url); } catch {
    if (d.files.overlay && url !== d.files.overlay) {
      img = await loadImage(d.files.overlay); note = "the original image is missing; showing the overlay";
    } else { note = "image missing"; }
  }
  if (seq !== S.loadSeq) return;
  canvas.width = S.w; canvas.height = S.h;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, S.w, S.h);
  if (img) ctx.drawImage(img, 0, 0, S.w, S.h);
  if (img && S.view === "uncertainty" && url === d.files.uncertainty) {
    const id = ctx.getImageData(0, 0, S.w, S.h), p = id.data;
    for (let i = 0; i < p.length; i += 4) { const c = lut(p[i]); p[i] = c[0]; p[i + 1] = c[1]; p[i + 2] = c[2]; }
    ctx.putImageData(id, 0, 0);
    note = note || "uncertainty: dark = certain, bright = uncertain";
  }
  $("#view-note").textContent = note;
}

async function loadMask(url, seq) {
  const img = await loadImage(url);
  if (seq !== undefined && seq !== S.loadSeq) return;
  const c = document.createElement("canvas"); c.width = S.w; c.height = S.h;
  const ctx = c.getContext("2d"); ctx.drawImage(img, 0, 0);
  const p = ctx.getImageData(0, 0, S.w, S.h).data;
  S.mask = new Uint8Array(S.w * S.h);
  for (let i = 0; i < S.mask.length; i++) S.mask[i] = p[i * 4] > 127 ? 1 : 0;
  const mc = $("#mask"); mc.width = S.w; mc.height = S.h;
  S.maskCtx = mc.getContext("2d");
  S.maskImage = S.maskCtx.createImageData(S.w, S.h);
  renderMask();
}

function renderMask(x0 = 0, y0 = 0, x1 = S.w - 1, y1 = S.h - 1) {
  if (!S.mask) return;
  const w = S.w, h = S.h, m = S.mask, p = S.maskImage.data;
  x0 = Math.max(0, x0); y0 = Math.max(0, y0); x1 = Math.min(w - 1, x1); y1 = Math.min(h - 1, y1);
  const col = S.editing ? [255, 196, 0] : [0, 230, 118];
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const i = y * w + x, o = i * 4;
      let on = m[i] === 1;
      if (on && S.maskMode === "contour") {
        on = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !m[i - 1] || !m[i + 1] || !m[i - w] || !m[i + w];
      }
      if (S.maskMode === "off") on = false;
      p[o] = col[0]; p[o + 1] = col[1]; p[o + 2] = col[2]; p[o + 3] = on ? 255 : 0;
    }
  }
  S.maskCtx.putImageData(S.maskImage, 0, 0, x0, y0, x1 - x0 + 1, y1 - y0 + 1);
  applyOpacity();
}
function applyOpacity() {
  $("#mask").style.opacity = S.maskMode === "contour" ? Math.max(S.opacity, 0.6) : S.opacity;
}

function fitScale() {
  const wrap = $("#stage-wrap");
  return Math.max(0.05, Math.min((wrap.clientWidth - 16) / S.w, (wrap.clientHeight - 16) / S.h));
}
function layout() {
  if (!S.w) return;
  const scale = S.zoom ?? fitScale();
  S.scale = scale;
  const st = $("#stage");
  st.style.width = Math.round(S.w * scale) + "px";
  st.style.height = Math.round(S.h * scale) + "px";
  const wrap = $("#stage-wrap");
  st.style.marginTop = Math.max(8, (wrap.clientHeight - S.h * scale) / 2) + "px";
  st.classList.toggle("pixelated", scale >= 2);
  updateCursorSize();
}
function zoomBy(f) { S.zoom = Math.min(32, Math.max(0.05, (S.zoom ?? fitScale()) * f)); layout(); }

async function setView(v) {
  S.view = v;
  $$("[data-view]").forEach((b) => b.classList.toggle("on", b.dataset.view === v));
  if (S.detail) await loadBase(S.loadSeq);
}
function setMaskMode(m) {
  S.maskMode = m;
  $$("[data-mode]").forEach((b) => b.classList.toggle("on", b.dataset.mode === m));
  renderMask();
}

// ---------------------------------------------------------------- editing
function undoLimit() { return Math.max(3, Math.min(40, Math.floor(120e6 / Math.max(1, S.w * S.h)))); }

function startEdit() {
  if (!S.detail || S.editing) return;
  S.editing = true; S.dirty = false; S.undo = [];
  if (S.maskMode === "off") setMaskMode("fill");
  $("#edit-bar").hidden = false;
  $("#stage").classList.add("editing");
  renderMask(); layout();
}
function endEdit() {
  S.editing = false; S.dirty = false; S.undo = [];
  $("#edit-bar").hidden = true; $("#cursor").hidden = true;
  $("#stage").classList.remove("editing");
  renderMask(); layout();
}
async function cancelEdit() {
  if (!S.editing) return;
  endEdit();
  await loadMask(S.detail.files.mask);
}
function setTool(t) {
  S.tool = t;
  $$("[data-tool]").forEach((b) => b.classList.toggle("on", b.dataset.tool === t));
  $("#cursor").classList.toggle("eraser", t === "eraser");
}
function setBrush(r) {
  S.brush = Math.max(1, Math.min(150, Math.round(r)));
  $("#brush").value = S.brush; $("#brush-val").textContent = S.brush;
  updateCursorSize();
}
function updateCursorSize() {
  const c = $("#cursor"), d = Math.max(4, 2 * S.brush * (S.scale || 1));
  c.style.width = d + "px"; c.style.height = d + "px";
}
function toImage(e) {
  const r = $("#mask").getBoundingClientRect();
  return [((e.clientX - r.left) * S.w) / r.width, ((e.clientY - r.top) * S.h) / r.height];
}
function stamp(cx, cy) {
  const r = S.brush, v = S.tool === "brush" ? 1 : 0, w = S.w, h = S.h, r2 = r * r;
  const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(w - 1, Math.ceil(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(h - 1, Math.ceil(cy + r));
  for (let y = y0; y <= y1; y++) {
    const dy = y + 0.5 - cy;
    for (let x = x0; x <= x1; x++) {
      const dx = x + 0.5 - cx;
      if (dx * dx + dy * dy <= r2) S.mask[y * w + x] = v;
    }
  }
  return [x0, y0, x1, y1];
}
function strokeTo(x, y) {
  const [lx, ly] = S.last || [x, y];
  const dist = Math.hypot(x - lx, y - ly), step = Math.max(0.5, S.brush / 3);
  const n = Math.max(1, Math.ceil(dist / step));
  let bx0 = Infinity, by0 = Infinity, bx1 = -1, by1 = -1;
  for (let k = 1; k <= n; k++) {
    const [a, b, c, d] = stamp(lx + ((x - lx) * k) / n, ly + ((y - ly) * k) / n);
    bx0 = Math.min(bx0, a); by0 = Math.min(by0, b); bx1 = Math.max(bx1, c); by1 = Math.max(by1, d);
  }
  S.last = [x, y]; S.dirty = true;
  renderMask(bx0 - 1, by0 - 1, bx1 + 1, by1 + 1);
}
function moveCursor(e) {
  const c = $("#cursor"), st = $("#stage").getBoundingClientRect();
  c.style.left = e.clientX - st.left + "px"; c.style.top = e.clientY - st.top + "px";
}
function pushUndo() {
  S.undo.push(S.mask.slice());
  while (S.undo.length > undoLimit()) S.undo.shift();
}
function undo() {
  if (!S.editing || !S.undo.length) return;
  S.mask = S.undo.pop(); S.dirty = true; renderMask();
}
function maskPngDataUrl() {
  const c = document.createElement("canvas"); c.width = S.w; c.height = S.h;
  const ctx = c.getContext("2d"), id = ctx.createImageData(S.w, S.h), p = id.data;
  for (let i = 0; i < S.mask.length; i++) {
    const v = S.mask[i] ? 255 : 0; p[i * 4] = v; p[i * 4 + 1] = v; p[i * 4 + 2] = v; p[i * 4 + 3] = 255;
  }
  ctx.putImageData(id, 0, 0);
  return c.toDataURL("image/png");
}
async function saveEdit() {
  if (!S.editing) return;
  const body = { action: "edit", label: $("#edit-label").value, mask_png: maskPngDataUrl() };
  const ok = await decide(body);
  if (ok) endEdit();
}

// ---------------------------------------------------------------- decisions
async function decide(extra) {
  if (!S.detail || S.busy) return false;
  const d = S.detail, i = S.pos;
  const body = { key: d.key, based_on: d.current.decision_id, request_id: requestId(), ...extra };
  const who = reviewer(); if (who) body.reviewer = who;
  S.busy = true;
  try {
    let res, tries = 0;
    for (;;) { // retries are safe: the request id makes the write happen once
      try { res = await api("/api/decisions", { json: body }); break; } catch (e) {
        if (e.status || ++tries >= 3) throw e;
        await new Promise((r) => setTimeout(r, 400 * tries));
      }
    }
    const dec = res.decision;
    toast(`${ACTION_MARK[dec.action]} ${dec.action}: ${d.key} → ${dec.label}`, "ok");
    if (res.warning) toast(res.warning, "warn");
    if (res.conflict) {
      const o = res.intervening.map((x) => `${x.action} by ${x.reviewer}`).join(", ");
      toast(`Meanwhile on this image: ${o}. Your decision was recorded after it.`, "warn");
    }
    const cur = { reviewed: true, label: dec.label, mask_area: dec.mask_area, decision_id: dec.id,
      action: dec.action, reviewer: dec.reviewer, created: dec.created };
    if (S.queue[i] && S.queue[i].key === d.key) S.queue[i].current = cur;
    renderQueue(); markQueueItem(S.pos);
    loadSummary().catch(() => {});
    S.busy = false;
    if (S.editing) endEdit();
    if ($("#advance").checked && i + 1 < S.queue.length) await select(i + 1);
    else if (S.pos === i) await select(i);
    return true;
  } catch (e) {
    toast("Not saved: " + e.message, "err");
    return false;
  } finally { S.busy = false; }
}

function guardNav(fn) {
  if (S.editing && S.dirty) { toast("Unsaved mask: Enter saves it, Esc discards it.", "warn"); return; }
  if (S.editing) endEdit();
  return fn();
}

// ---------------------------------------------------------------- wiring
function bind() {
  $$(".toolbar [data-view]").forEach((b) => b.addEventListener("click", () => setView(b.dataset.view)));
  $$("[data-mode]").forEach((b) => b.addEventListener("click", () => setMaskMode(b.dataset.mode)));
  $$("[data-tool]").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  $("#opacity").addEventListener("input", (e) => { S.opacity = e.target.value / 100; applyOpacity(); });
  $("#brush").addEventListener("input", (e) => setBrush(+e.target.value));
  $("#zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("#zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("#zoom-fit").addEventListener("click", () => { S.zoom = null; layout(); });
  $("#undo").addEventListener("click", undo);
  $("#save-edit").addEventListener("click", saveEdit);
  $("#cancel-edit").addEventListener("click", cancelEdit);
  $("#act-accept").addEventListener("click", () => guardNav(() => decide({ action: "accept" })));
  $("#act-reject").addEventListener("click", () => guardNav(() => decide({ action: "reject" })));
  $("#act-edit").addEventListener("click", () => (S.editing ? saveEdit() : startEdit()));
  $("#act-relabel").addEventListener("click", () => guardNav(() => decide({ action: "relabel", label: $("#relabel-select").value })));
  for (const id of ["#f-flagged", "#f-reviewed", "#f-label", "#f-reason"]) {
    $(id).addEventListener("change", () => guardNav(() => loadQueue(S.detail && S.detail.key)));
  }
  $("#reviewer").addEventListener("change", (e) => localStorage.setItem("pixelvote.reviewer", e.target.value.trim()));
  window.addEventListener("resize", layout);

  const mc = $("#mask");
  mc.addEventListener("pointerdown", (e) => {
    if (!S.editing || e.button !== 0) return;
    mc.setPointerCapture(e.pointerId);
    pushUndo(); S.drawing = true; S.last = null;
    strokeTo(...toImage(e));
  });
  mc.addEventListener("pointermove", (e) => {
    if (!S.editing) return;
    $("#cursor").hidden = false; moveCursor(e);
    if (S.drawing) strokeTo(...toImage(e));
  });
  const stop = () => { S.drawing = false; S.last = null; };
  mc.addEventListener("pointerup", stop);
  mc.addEventListener("pointercancel", stop);
  mc.addEventListener("pointerleave", () => { $("#cursor").hidden = true; });
  $("#stage-wrap").addEventListener("wheel", (e) => {
    if (!e.ctrlKey) return;
    e.preventDefault(); zoomBy(e.deltaY < 0 ? 1.1 : 0.9);
  }, { passive: false });

  document.addEventListener("keydown", onKey);
}

function onKey(e) {
  const tag = (e.target.tagName || "").toLowerCase();
  if (tag === "input" || tag === "textarea" || tag === "select") {
    if (e.key === "Escape") e.target.blur();
    if (e.key === "Enter" && e.target.id === "relabel-select") { e.preventDefault(); e.target.blur(); $("#act-relabel").click(); }
    return;
  }
  if (e.altKey || e.metaKey) return;
  const k = e.key;
  if (e.ctrlKey) {
    if (k === "z" || k === "Z") { e.preventDefault(); undo(); }
    return;
  }
  const handled = () => e.preventDefault();
  if (S.editing) {
    if (k === "Enter" || k === "s" || k === "S") { handled(); saveEdit(); return; }
    if (k === "Escape") { handled(); cancelEdit(); return; }
    if (k === "b" || k === "B") { handled(); setTool("brush"); return; }
    if (k === "x" || k === "X") { handled(); setTool("eraser"); return; }
    if (k === "[") { handled(); setBrush(S.brush / 1.25); return; }
    if (k === "]") { handled(); setBrush(S.brush * 1.25 + 1); return; }
    if (k === "z" || k === "u") { handled(); undo(); return; }
  }
  switch (k) {
    case "a": case "A": handled(); guardNav(() => decide({ action: "accept" })); break;
    case "r": case "R": handled(); if (S.meta.background !== null) guardNav(() => decide({ action: "reject" })); break;
    case "e": case "E": handled(); if (S.editing) saveEdit(); else startEdit(); break;
    case "l": case "L": handled(); $("#relabel-select").focus(); break;
    case "ArrowRight": case "j": handled(); guardNav(() => select(Math.min(S.pos + 1, S.queue.length - 1))); break;
    case "ArrowLeft": case "k": handled(); guardNav(() => select(Math.max(S.pos - 1, 0))); break;
    case "f": case "F": handled(); setMaskMode(S.maskMode === "fill" ? "contour" : "fill"); break;
    case "v": case "V": {
      handled();
      const views = ["image", "heat", "uncertainty"]; setView(views[(views.indexOf(S.view) + 1) % views.length]); break;
    }
    case "+": case "=": handled(); zoomBy(1.25); break;
    case "-": handled(); zoomBy(0.8); break;
    case "0": handled(); S.zoom = null; layout(); break;
    default: break;
  }
}

async function main() {
  bind();
  S.meta = await api("/api/meta");
  $("#out-name").textContent = "· " + S.meta.name;
  document.title = `pixelvote review · ${S.meta.name}`;
  $("#reviewer").value = localStorage.getItem("pixelvote.reviewer") || S.meta.reviewer;
  $("#f-label").innerHTML += S.meta.classes.map((c) => `<option value="${esc(c)}">${esc(c)}</option>`).join("");
  $("#f-reason").innerHTML += S.meta.reasons.map((r) => `<option value="${esc(r)}">${esc(REASON_TEXT[r] || r)}</option>`).join("");
  const hashKey = location.hash ? decodeURIComponent(location.hash.slice(1)) : null;
  await Promise.all([loadSummary(), loadQueue(hashKey)]);
  setInterval(() => { loadSummary().catch(() => {}); }, 20000);
  document.body.dataset.ready = "1";
}
main().catch((e) => toast("Cannot start: " + e.message, "err"));
