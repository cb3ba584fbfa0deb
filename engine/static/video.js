// onnxdream's page, the video part: when the server dreams videos, the file input takes clips
// too; a clip goes to POST /jobs as 'video', its progress shows in frames and the result plays
// in a <video>. Photos stay with app.js, whose helpers (api, setStatus, busy, fmtEta) this
// file shares (app.js loads first); a submit with a clip is taken before app.js sees it.
"use strict";
(() => {
  const el = (id) => document.getElementById(id);
  const form = el("form"), input = el("image");
  const VIDEO_NAME = /\.(mp4|m4v|mov|webm|mkv|avi|mpe?g|ogv|3gp|wmv|flv)$/i;
  let server = null;  // /health's "video": limits, once the server says it dreams videos
  let current = null, resultUrl = null, previewUrl = null, clip = null;

  const isVideo = (f) => !!f && (f.type.startsWith("video/") || VIDEO_NAME.test(f.name));

  // -- the video options, shown while a clip is chosen
  const box = document.createElement("div");
  box.id = "video_options"; box.hidden = true;
  box.innerHTML =
    '<div class="row"><div><label for="video_width">Width <span class="hint">(pixels)</span></label>' +
    '<input id="video_width" type="number" min="32" step="2"></div>' +
    '<div><label for="video_format">Format</label><select id="video_format">' +
    '<option value="mp4">MP4</option><option value="webm">WebM</option>' +
    '<option value="gif">GIF</option></select></div></div>' +
    '<label class="check"><input id="video_flow" type="checkbox" checked> follow the motion ' +
    '<span class="hint">(optical flow)</span></label>';
  form.querySelector(".buttons").before(box);

  function fitWidth(w, h) {  // the widest even width within the server's pixel limit, at most 640
    const max = server ? Math.floor(Math.sqrt(server.max_pixels * w / h)) : w;
    return Math.max(32, Math.min(w, max, 640) - (Math.min(w, max, 640) % 2));
  }

  function showClip() {
    const f = input.files[0];
    clip = null;
    box.hidden = !(server && isVideo(f));
    if (box.hidden) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(f);
    const v = document.createElement("video");
    v.muted = true; v.controls = true; v.playsInline = true; v.preload = "metadata";
    v.addEventListener("loadedmetadata", () => {
      clip = { width: v.videoWidth, height: v.videoHeight, seconds: v.duration };
      el("original_info").textContent =
        `${v.videoWidth}×${v.videoHeight} · ${v.duration.toFixed(1)} s`;
      if (v.videoWidth && !el("video_width").value) {
        el("video_width").value = fitWidth(v.videoWidth, v.videoHeight);
      }
    });
    el("video_width").value = "";
    v.src = previewUrl;
    el("original_frame").replaceChildren(v);
  }

  function showResult(blob, job) {
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = URL.createObjectURL(blob);
    const old = el("result_video");
    if (old) old.remove();
    const v = document.createElement(job.format === "gif" ? "img" : "video");
    v.id = "result_video";
    el("result_frame").append(v);
    if (v.tagName === "VIDEO") {
      v.controls = true; v.loop = true; v.muted = true; v.autoplay = true; v.playsInline = true;
    } else { v.alt = "the dreamed video"; }
    v.src = resultUrl; v.hidden = false;
    el("result").hidden = true;
    el("result_placeholder").hidden = true;
    const dl = el("download");
    dl.href = resultUrl; dl.download = `dream-${job.seed}.${job.format}`; dl.hidden = false;
  }

  async function poll(id) {
    while (current === id) {
      const s = await (await api(`/jobs/${id}`)).json();
      if (current !== id) return;
      if (s.state === "queued") {
        setStatus(`waiting in the queue (position ${(s.queue_position ?? 0) + 1})`, 0);
      } else if (s.state === "running" && s.stage === "encode") {
        setStatus("encoding the video…", s.progress);
      } else if (s.state === "running") {
        const rate = s.fps ? ` · ${s.fps.toFixed(2)} frames/s` : "";
        setStatus(`dreaming frame ${s.frames_done} of ${s.frames_total}${rate}${fmtEta(s.eta_s)}`,
               s.progress);
      } else if (s.state === "done") {
        const r = await api(`/jobs/${id}/result`);
        showResult(await r.blob(), s);
        setStatus(`done: ${s.frames_total} frames in ${s.elapsed_s.toFixed(1)} s ` +
               `(${s.fps.toFixed(2)} frames/s, seed ${s.seed})`, 1);
        api(`/jobs/${id}`, { method: "DELETE" }).catch(() => {});
        current = null; busy(false);
        return;
      } else {
        throw new Error(s.error || `the dream ${s.state}`);
      }
      await new Promise((ok) => setTimeout(ok, 500));
    }
  }

  // a clip: taken here, in the capture phase, before app.js's photo handler sees the submit
  document.addEventListener("submit", async (ev) => {
    if (ev.target !== form) return;
    const f = input.files[0];
    const v = el("result_video");
    if (!server || !isVideo(f)) { if (v) v.hidden = true; return; }  // a photo: app.js's
    ev.preventDefault(); ev.stopPropagation();
    el("error").textContent = "";
    if (clip && clip.seconds > server.max_seconds + 0.05) {
      el("error").textContent = `this clip is ${clip.seconds.toFixed(1)} s long; this server ` +
        `dreams up to ${server.max_seconds} s`;
      return;
    }
    const body = new FormData();
    body.append("video", f, f.name);
    body.append("model", el("model").value);
    if (el("layer").value) body.append("layer", el("layer").value);
    for (const k of ["step_size", "steps", "octaves", "seed"]) {
      if (el(k).value !== "") body.append(k, el(k).value);
    }
    if (el("video_width").value !== "") body.append("width", el("video_width").value);
    body.append("format", el("video_format").value);
    body.append("flow", el("video_flow").checked ? "true" : "false");
    busy(true); setStatus("uploading the clip…", 0);
    try {
      const created = await (await api("/jobs", { method: "POST", body })).json();
      current = created.id;
      await poll(created.id);
    } catch (e) {
      current = null; busy(false); setStatus(""); el("error").textContent = e.message;
    }
  }, true);

  el("cancel").addEventListener("click", () => {
    const id = current;
    if (!id) return;
    current = null; busy(false); setStatus("cancelled");
    api(`/jobs/${id}`, { method: "DELETE" }).catch(() => {});
  });
  input.addEventListener("change", showClip);

  fetch("/health").then((r) => r.json()).then((h) => {
    if (!h.video || !h.video.available) return;
    server = { ...h.video, max_pixels: h.max_pixels };
    input.accept = "image/*,video/*";
    const label = document.querySelector("label[for='image']");
    if (label) {
      label.textContent = "Photo or video ";
      const hint = document.createElement("span");
      hint.className = "hint";
      hint.textContent = `(clips up to ${server.max_seconds} s)`;
      label.append(hint);
    }
    showClip();
  }).catch(() => { /* no video: the page stays a photo page */ });
})();
