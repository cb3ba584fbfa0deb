// onnxdream's page (served as a file: the CSP allows no inline scripts)
"use strict";
const $ = (id) => document.getElementById(id);
let job = null, originalUrl = null, resultUrl = null;

async function api(url, options) {
  const r = await fetch(url, options);
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return r;
}
function showError(msg) { $("error").textContent = msg || ""; }
function setStatus(text, progress) {
  $("status").textContent = text;
  $("progress").hidden = progress == null;
  if (progress != null) $("progress").value = progress;
}
function busy(on) { $("dream").disabled = on; $("cancel").disabled = !on; }

async function loadModels() {
  const data = await (await api("/models")).json();
  const sel = $("model");
  sel.innerHTML = "";
  for (const m of data.models) {
    if (!m.installed) continue;
    const o = new Option(m.name + (m.default ? " (default)" : ""), m.name);
    o.selected = m.default; sel.add(o);
  }
  await loadLayers();
  const h = await (await api("/health")).json();
  $("footer").textContent = `onnxdream ${h.version} · ${h.provider} · ${h.workers} worker(s) · ` +
    `up to ${(h.max_pixels / 1e6).toFixed(1)} MP`;
}
async function loadLayers() {
  const sel = $("layer");
  sel.innerHTML = ""; sel.add(new Option("loading…", ""));
  try {
    const data = await (await api(`/models/${encodeURIComponent($("model").value)}/layers`)).json();
    sel.innerHTML = "";
    const defaults = data.default_layers || [];
    for (const name of data.layers) {
      const o = new Option(name + (defaults.includes(name) ? " (recommended)" : ""), name);
      o.selected = defaults.length ? name === defaults[0] : false; sel.add(o);
    }
  } catch (e) { sel.innerHTML = ""; sel.add(new Option("default", "")); showError(e.message); }
}

function showOriginal() {
  const f = $("image").files[0];
  if (!f) return;
  if (originalUrl) URL.revokeObjectURL(originalUrl);
  originalUrl = URL.createObjectURL(f);
  const img = new Image();
  img.onload = () => { $("original_info").textContent = `${img.naturalWidth}×${img.naturalHeight}`; };
  img.alt = "the original photo"; img.src = originalUrl;
  $("original_frame").replaceChildren(img);
}

function fmtEta(s) {
  if (s == null) return "";
  return s < 60 ? ` · about ${Math.ceil(s)} s left` : ` · about ${Math.ceil(s / 60)} min left`;
}

async function poll(id) {
  while (job === id) {
    const s = await (await api(`/jobs/${id}`)).json();
    if (job !== id) return;
    if (s.state === "queued") {
      setStatus(`waiting in the queue (position ${(s.queue_position ?? 0) + 1})`, 0);
    } else if (s.state === "running") {
      setStatus(`dreaming: octave ${s.octave}, ${Math.round(s.progress * 100)}%${fmtEta(s.eta_s)}`, s.progress);
    } else if (s.state === "done") {
      const r = await api(`/jobs/${id}/result`);
      const blob = await r.blob();
      if (resultUrl) URL.revokeObjectURL(resultUrl);
      resultUrl = URL.createObjectURL(blob);
      const img = $("result");
      img.src = resultUrl; img.hidden = false;
      $("result_placeholder").hidden = true;
      const ext = (s.format === "jpeg" || s.format === "jpg") ? "jpg" : s.format;
      const dl = $("download");
      dl.href = resultUrl; dl.download = `dream-${s.seed}.${ext}`; dl.hidden = false;
      setStatus(`done in ${s.elapsed_s.toFixed(1)} s (seed ${s.seed})`, 1);
      api(`/jobs/${id}`, { method: "DELETE" }).catch(() => {});
      job = null; busy(false);
      return;
    } else {
      throw new Error(s.error || `the dream ${s.state}`);
    }
    await new Promise((ok) => setTimeout(ok, 400));
  }
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  const f = $("image").files[0];
  if (!f) { showError("choose a photo first"); return; }
  const form = new FormData();
  form.append("image", f, f.name);
  form.append("model", $("model").value);
  if ($("layer").value) form.append("layer", $("layer").value);
  for (const k of ["step_size", "steps", "octaves", "seed"]) {
    if ($(k).value !== "") form.append(k, $(k).value);
  }
  busy(true); setStatus("uploading…", 0);
  try {
    const created = await (await api("/jobs", { method: "POST", body: form })).json();
    job = created.id;
    await poll(created.id);
  } catch (e) {
    job = null; busy(false); setStatus(""); showError(e.message);
  }
});
$("cancel").addEventListener("click", async () => {
  const id = job; job = null; busy(false); setStatus("cancelled");
  if (id) api(`/jobs/${id}`, { method: "DELETE" }).catch(() => {});
});
$("image").addEventListener("change", showOriginal);
$("model").addEventListener("change", loadLayers);
const syncStrength = () => { $("step_size_value").textContent = `(step ${Number($("step_size").value).toFixed(3)})`; };
$("step_size").addEventListener("input", syncStrength);
syncStrength();
loadModels().catch((e) => showError("cannot reach the server: " + e.message));
