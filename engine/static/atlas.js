// The layer atlas beside the layer picker: a thumbnail of what each recommended layer dreams
// (GET /models/{name}/atlas, computed once per model on the server and polled while it works).
// Clicking a thumbnail picks that layer. Also sets the strength slider to the model's
// recommended step size when the model changes. No inline script: loaded with defer.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const model = $("model"), layer = $("layer"), box = $("atlas"), strength = $("step_size");
  if (!model || !layer || !box) return;
  let current = null;   // the model the atlas shows
  let timer = null;

  function highlight() {
    for (const b of box.querySelectorAll("button[data-layer]")) {
      b.setAttribute("aria-pressed", String(b.dataset.layer === layer.value));
    }
  }

  function cell(row) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "atlas-cell";
    b.dataset.layer = row.layer;
    b.title = `dream at ${row.layer}`;
    if (row.url) {
      const img = document.createElement("img");
      img.src = row.url; img.alt = `what ${row.layer} dreams`; img.loading = "lazy";
      b.append(img);
    } else {
      const wait = document.createElement("span");
      wait.className = "atlas-wait"; wait.textContent = "…";
      b.append(wait);
    }
    const label = document.createElement("span");
    label.className = "atlas-label"; label.textContent = row.layer;
    b.append(label);
    b.addEventListener("click", () => {
      if (![...layer.options].some((o) => o.value === row.layer)) return;
      layer.value = row.layer;
      layer.dispatchEvent(new Event("change"));
      highlight();
    });
    return b;
  }

  function show(data) {
    const note = document.createElement("div");
    note.className = "atlas-note";
    note.textContent = data.state === "done" ? "what each recommended layer dreams"
      : `computing layer previews… ${Math.round((data.progress || 0) * 100)}%`;
    box.replaceChildren(note, ...data.layers.map(cell));
    box.hidden = data.layers.length === 0;
    highlight();
  }

  async function poll(name) {
    clearTimeout(timer);
    if (name !== current) return;
    let r;
    try {
      r = await fetch(`/models/${encodeURIComponent(name)}/atlas`);
    } catch (e) { box.hidden = true; return; }
    if (name !== current) return;
    if (!r.ok) { box.hidden = true; return; }   // previews are a nicety: no error shown
    const data = await r.json();
    show(data);
    if (r.status === 202) {
      const wait = Math.min(30, Math.max(1, Number(r.headers.get("Retry-After")) || 2));
      timer = setTimeout(() => poll(name), wait * 1000);
    }
  }

  async function recommendedStep(name) {
    if (!strength) return;
    try {
      const r = await fetch(`/models/${encodeURIComponent(name)}/layers`);
      if (!r.ok || name !== current) return;
      const data = await r.json();
      if (data.step_size) {
        strength.value = String(data.step_size);
        strength.dispatchEvent(new Event("input"));
      }
    } catch (e) { /* keep the slider as it is */ }
  }

  function refresh() {
    const name = model.value;
    if (!name || name === current) return;
    current = name;
    box.replaceChildren();
    box.hidden = true;
    recommendedStep(name);
    poll(name);
  }

  model.addEventListener("change", refresh);
  layer.addEventListener("change", highlight);
  // the page fills the pickers after it loads: follow it
  new MutationObserver(() => setTimeout(refresh, 0)).observe(model, { childList: true });
  new MutationObserver(highlight).observe(layer, { childList: true });
  refresh();
})();
