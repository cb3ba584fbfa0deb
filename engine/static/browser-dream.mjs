// onnxdream in the browser: the compiled step graph on onnxruntime-web (engine/browser/site.py says what an
// exported site holds). This one file is the exported site's onnxdream.mjs and the server page's
// /static/browser-dream.mjs: the engine (Dreamer), the page of a static site (mountSite) and the
// "dream in this browser" path of the server's page (mountServer). No bundler, no dependencies
// beyond onnxruntime-web's own modules, loaded on first use.
//
// One step (roll by the jitter, gradient, unroll, x + step * g / (mean|g| + 1e-8), clip) is ONE
// ONNX graph, the one the CUDA loop runs; this module only orchestrates octaves (the resolver's
// rule, mirrored below), the octave resize (an ONNX Resize graph equal to imageio.resize), the
// jitter (numpy's default_rng, ported bit for bit: same seed, same rolls as the CLI) and the PNG
// with the CLI's provenance text chunks. The photo never leaves the page.

// ---- numpy's default_rng(seed).integers(low, high, n) --------------------------------------------
// SeedSequence -> PCG64 (XSL-RR 128/64, BigInt), PCG64's buffered 32-bit draws (low half first, the
// spare half kept across calls) and Lemire's bounded method with numpy's rejection threshold.
// Ranges below 2^32. Checked against numpy for 80 (seed, jitter) pairs x 200 draws.
const M32 = 0xffffffff, MASK64 = (1n << 64n) - 1n, MASK128 = (1n << 128n) - 1n;
const PCG_MULT = 0x2360ed051fc65da44385df649fccf645n;

function seedSequenceState(seed, nWords32) {          // SeedSequence(seed).generate_state(n, uint32)
  const hashmix = (v, h) => { v = (v ^ h.c) >>> 0; h.c = Math.imul(h.c, 0x931e8875) >>> 0;
                              v = Math.imul(v, h.c) >>> 0; return (v ^ (v >>> 16)) >>> 0; };
  const mix = (x, y) => { const r = (Math.imul(0xca01f9dd, x) - Math.imul(0x4973f715, y)) >>> 0;
                          return (r ^ (r >>> 16)) >>> 0; };
  let n = BigInt(seed); const entropy = [];           // the int as little-endian 32-bit words
  do { entropy.push(Number(n & 0xffffffffn)); n >>= 32n; } while (n > 0n);
  const pool = [0, 0, 0, 0], h = {c: 0x43b0d7e5};
  for (let i = 0; i < 4; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0, h);
  for (let s = 0; s < 4; s++) for (let d = 0; d < 4; d++) if (s !== d) pool[d] = mix(pool[d], hashmix(pool[s], h));
  for (let s = 4; s < entropy.length; s++) for (let d = 0; d < 4; d++) pool[d] = mix(pool[d], hashmix(entropy[s], h));
  const out = []; let hc = 0x8b51f9dd;
  for (let i = 0; i < nWords32; i++) {
    let v = (pool[i % 4] ^ hc) >>> 0; hc = Math.imul(hc, 0x58f38ded) >>> 0;
    v = Math.imul(v, hc) >>> 0; out.push((v ^ (v >>> 16)) >>> 0);
  }
  return out;
}

export class NumpyRng {
  constructor(seed) {
    const w = seedSequenceState(seed, 8);             // generate_state(4, uint64), little-endian pairs
    const u64 = (i) => (BigInt(w[2 * i + 1]) << 32n) | BigInt(w[2 * i]);
    const initstate = (u64(0) << 64n) | u64(1), initseq = (u64(2) << 64n) | u64(3);
    this.inc = ((initseq << 1n) | 1n) & MASK128;
    this.state = 0n; this.step(); this.state = (this.state + initstate) & MASK128; this.step();
    this.buffered = null;
  }
  step() { this.state = (this.state * PCG_MULT + this.inc) & MASK128; }
  nextUint64() {
    this.step();
    const s = this.state, rot = Number(s >> 122n);
    const x = ((s >> 64n) ^ s) & MASK64;
    return ((x >> BigInt(rot)) | (x << BigInt((64 - rot) & 63))) & MASK64;
  }
  nextUint32() {
    if (this.buffered !== null) { const v = this.buffered; this.buffered = null; return v; }
    const v = this.nextUint64(); this.buffered = Number(v >> 32n); return Number(v & 0xffffffffn);
  }
  integers(low, high, n) {                            // high exclusive, high - low <= 2^32
    const rng = high - low - 1, out = [];
    for (let i = 0; i < n; i++) {
      if (rng === 0) { out.push(low); continue; }
      const excl = BigInt(rng + 1);
      let m = BigInt(this.nextUint32()) * excl, left = Number(m & 0xffffffffn);
      if (left < rng + 1) {
        const threshold = (M32 - rng) % (rng + 1);
        while (left < threshold) { m = BigInt(this.nextUint32()) * excl; left = Number(m & 0xffffffffn); }
      }
      out.push(low + Number(m >> 32n));
    }
    return out;
  }
}

// ---- Python's spelling of numbers, JSON and shell words (the provenance must read as the CLI's) --
export function pyRound(x) {                          // round(): ties to even
  const f = Math.floor(x), d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}
export function pyFloat(x) {                          // repr(float)
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : (x > 0 ? "inf" : "-inf");
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mant, e] = x.toExponential().split("e"), exp = Number(e);  // shortest round-trip digits
  const neg = mant.startsWith("-"), digits = mant.replace(/^-/, "").replace(".", "");
  let s;
  if (exp >= -4 && exp < 16) {                        // Python: fixed for 1e-4 <= |x| < 1e16
    if (exp < 0) s = "0." + "0".repeat(-exp - 1) + digits;
    else if (digits.length > exp + 1) s = digits.slice(0, exp + 1) + "." + digits.slice(exp + 1);
    else s = digits + "0".repeat(exp + 1 - digits.length) + ".0";
  } else {
    const m = digits.length > 1 ? digits[0] + "." + digits.slice(1) : digits;
    s = `${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  return (neg ? "-" : "") + s;
}
function pyStr(v, isFloat) {                          // str() of a setting (None -> "", as describe())
  if (v === null || v === undefined) return "";
  if (typeof v === "boolean") return v ? "True" : "False";
  if (typeof v === "number") return isFloat ? pyFloat(v) : String(v);
  return String(v);
}
function pyJson(v, floats = new Set(), key = "") {    // json.dumps(v, sort_keys=True)
  if (Array.isArray(v)) return "[" + v.map((x) => pyJson(x, floats, key)).join(", ") + "]";
  if (v && typeof v === "object") {
    return "{" + Object.keys(v).sort().map((k) => JSON.stringify(k) + ": " + pyJson(v[k], floats, k)).join(", ") + "}";
  }
  if (typeof v === "number") return floats.has(key) ? pyFloat(v) : String(v);
  return JSON.stringify(v).replace(/[\u0080-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}
function shQuote(s) {                                 // shlex.quote
  s = String(s);
  if (s === "") return "''";
  return /[^\w@%+=:,./-]/.test(s) ? "'" + s.replace(/'/g, "'\"'\"'") + "'" : s;
}

// ---- the resolver's octave rule (onnxdream.settings.resolve; the tests compare the two) -------------------
export function autoOctaves(h, w, native, scale, rule) {
  const r = Math.min(h / native[0], w / native[1]);
  const x = r > 1 ? Math.log(r) / Math.log(scale) : 0;
  return Math.max(rule.min_auto_octaves, Math.min(rule.max_octaves, 1 + Math.ceil(x - 1e-9)));
}
export function octaveSizes(h, w, octaves, scale, rule, native = [224, 224]) {
  const n = octaves === "auto" ? autoOctaves(h, w, native, scale, rule) : octaves;
  const sizes = [[h, w]];
  for (let i = 0; i < n - 1; i++) {
    const [ph, pw] = sizes[sizes.length - 1];
    const nh = pyRound(ph / scale), nw = pyRound(pw / scale);
    if (Math.min(nh, nw) < rule.min_octave_side) break;
    sizes.push([nh, nw]);
  }
  return sizes;                                       // largest (the image) first
}

// ---- settings: the CLI's names, DreamSettings' ranges (manifest.limits) --------------------------
const BROWSER_ONLY = ["layer", "backend", "threads"];
const FLOATS = new Set(["octave_scale", "step_size"]);

export function checkSettings(manifest, given = {}) {
  const limits = manifest.limits, d = manifest.defaults;
  const known = [...BROWSER_ONLY, ...Object.keys(limits)];
  for (const k of Object.keys(given)) {
    if (!known.includes(k)) throw new Error(`unknown setting '${k}' (settings: ${known.join(", ")})`);
  }
  const s = {layer: manifest.default_layer, backend: "wasm", seed: null, ...d};
  for (const [k, v] of Object.entries(given)) if (v !== undefined && v !== null && v !== "") s[k] = v;
  for (const [k, lim] of Object.entries(limits)) {
    let v = s[k];
    if (v === null && lim.optional) continue;
    if (v === "auto" && lim.auto) continue;
    if (typeof v === "string" && v.trim() !== "") v = Number(v);
    const range = lim.open_low ? `> ${lim.min} and <= ${lim.max}` : `between ${lim.min} and ${lim.max}`;
    const ok = typeof v === "number" && Number.isFinite(v) && (!lim.integer || Number.isInteger(v)) &&
      (lim.open_low ? v > lim.min : v >= lim.min) && v <= lim.max;
    if (!ok) throw new Error(`${k} must be ${lim.integer ? "an integer " : ""}${range}` +
                             (lim.auto ? ' (or "auto")' : "") + `, got ${JSON.stringify(given[k] ?? s[k])}`);
    s[k] = v;
  }
  if (!manifest.layers.some((l) => l.name === s.layer)) {
    throw new Error(`layer '${s.layer}' is not in this export (layers: ${manifest.layers.map((l) => l.name).join(", ")})`);
  }
  if (!["wasm", "webgpu"].includes(s.backend)) throw new Error(`backend must be wasm or webgpu, got '${s.backend}'`);
  if (s.seed === null) s.seed = crypto.getRandomValues(new Uint32Array(1))[0];
  // what was asked (provenance's "requested"): a step size not given is the model's
  const asked = given.step_size;
  s.requested_step_size = asked === undefined || asked === null || asked === "" ? null : s.step_size;
  return s;
}

// ---- provenance: onnxdream.settings.provenance.dream_metadata's keys, for a browser dream -----------------
// tile_size is 0 (the browser never tiles): the recorded command makes the same image on the CLI.
export function provenance(manifest, s, sizes, provider, image = "IMAGE", output = null) {
  const layer = manifest.layers.find((l) => l.name === s.layer);
  const values = {octaves: sizes.length, octave_scale: s.octave_scale, steps: s.steps, step_size: s.step_size,
                  jitter: s.jitter, tile_size: 0, normalize: manifest.defaults.normalize ?? "mean-abs",
                  grad_floor: null, max_loss: null};
  const asc = Object.fromEntries(manifest.ascent_fields.map((k) => [k, values[k]]));
  const argv = ["dream", image, ...(output !== null ? ["-o", output] : []), "--model", manifest.model.name,
    ...layer.argv_layers.flatMap((l) => ["--layer", l]), "--objective", manifest.objective,
    "--octaves", pyStr(asc.octaves, false), "--octave-scale", pyStr(asc.octave_scale, true),
    "--steps", String(asc.steps), "--step-size", pyStr(asc.step_size, true), "--jitter", String(asc.jitter),
    "--tile-size", "0", "--normalize", asc.normalize, "--seed", String(s.seed),
    ...(manifest.pre_relu ? ["--pre-relu"] : []), ...(manifest.border ? ["--border", String(manifest.border)] : [])];
  const meta = [
    ["version", manifest.onnxdream], ["model", manifest.model.name], ["objective", layer.objective],
    ["layers", pyJson(layer.terms)], ["pre_relu", pyStr(!!manifest.pre_relu)], ["border", String(manifest.border || 0)],
    ["preset", ""], ["provider", provider], ["command", "onnxdream " + argv.map(shQuote).join(" ")],
  ];
  for (const k of Object.keys(asc)) meta.push([k, pyStr(asc[k], FLOATS.has(k))]);
  meta.push(["seed", String(s.seed)]);
  const resolved = {octaves: sizes.length, octave_sizes: sizes, tile_size: 0, tile: [0, 0],
                    batch_pixels: manifest.resolver.batch_pixels, jitter: s.jitter, step_size: s.step_size};
  meta.push(["resolved", pyJson(resolved, new Set(["step_size"]))]);
  const requested = {...asc, octaves: s.octaves, step_size: s.requested_step_size ?? null};
  meta.push(["requested", pyJson(requested, FLOATS)]);
  return meta.map(([k, v]) => ["onnxdream:" + k, v]).concat(Object.entries(manifest.controls_metadata));
}

// ---- PNG (8-bit RGB/RGBA, Paeth rows, zlib by CompressionStream) with tEXt/iTXt chunks -----------
const CRC = (() => { const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) { let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1; t[n] = c >>> 0; }
  return t; })();
function crc32(bytes, crc = 0xffffffff) {
  for (let i = 0; i < bytes.length; i++) crc = CRC[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return crc;
}
function pngChunk(type, data) {
  const out = new Uint8Array(12 + data.length), view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, (crc32(out.subarray(4, 8 + data.length)) ^ 0xffffffff) >>> 0);
  return out;
}
function textChunk(key, value) {                      // as Pillow's PngInfo.add_text: tEXt if Latin-1
  const latin = /^[\u0000-\u00ff]*$/.test(value);
  const enc = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));
  if (latin) return pngChunk("tEXt", new Uint8Array([...enc(key), 0, ...enc(value)]));
  return pngChunk("iTXt", new Uint8Array([...enc(key), 0, 0, 0, 0, 0, ...new TextEncoder().encode(value)]));
}
async function deflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}
export async function encodePng(pixels, width, height, channels, texts = []) {
  const row = width * channels, raw = new Uint8Array(height * (row + 1));
  for (let y = 0; y < height; y++) {
    const o = y * (row + 1), p = y * row;
    raw[o] = 4;                                       // Paeth
    for (let i = 0; i < row; i++) {
      const a = i >= channels ? pixels[p + i - channels] : 0, b = y ? pixels[p - row + i] : 0;
      const c = y && i >= channels ? pixels[p - row + i - channels] : 0;
      const pa = Math.abs(b - c), pb = Math.abs(a - c), pc = Math.abs(a + b - 2 * c);
      raw[o + 1 + i] = pixels[p + i] - (pa <= pb && pa <= pc ? a : pb <= pc ? b : c);
    }
  }
  const ihdr = new Uint8Array(13), v = new DataView(ihdr.buffer);
  v.setUint32(0, width); v.setUint32(4, height); ihdr[8] = 8; ihdr[9] = channels === 4 ? 6 : 2;
  const parts = [Uint8Array.of(137, 80, 78, 71, 13, 10, 26, 10), pngChunk("IHDR", ihdr),
    ...texts.map(([k, val]) => textChunk(k, val)), pngChunk("IDAT", await deflate(raw)), pngChunk("IEND", new Uint8Array(0))];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

// ---- images ---------------------------------------------------------------------------------------
// -> {width, height, rgb: Float32Array [3,H,W] in [0,1] (as imageio.load_image), alpha: Uint8Array|null}
export async function decodeImage(source) {
  let blob = source;
  if (typeof source === "string" || source instanceof URL) {
    const r = await fetch(source);
    if (!r.ok) throw new Error(`cannot read the image ${source}: ${r.status} ${r.statusText}`);
    blob = await r.blob();
  }
  const bmp = await createImageBitmap(blob, {colorSpaceConversion: "none", premultiplyAlpha: "none"});
  const {width, height} = bmp;
  const canvas = typeof OffscreenCanvas !== "undefined" ? new OffscreenCanvas(width, height)
    : Object.assign(document.createElement("canvas"), {width, height});
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(bmp, 0, 0);
  bmp.close?.();
  const data = ctx.getImageData(0, 0, width, height).data, n = width * height;
  const rgb = new Float32Array(3 * n), scale = Math.fround(1 / 255);
  let alpha = null;
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < 3; c++) rgb[c * n + i] = Math.fround(data[4 * i + c] * scale);
    if (data[4 * i + 3] !== 255 && alpha === null) alpha = new Uint8Array(n).fill(255);
    if (alpha !== null) alpha[i] = data[4 * i + 3];
  }
  return {width, height, rgb, alpha};
}
function toPixels(rgb, alpha, width, height) {        // imageio.to_uint8: x*255 in float32, clip, rint
  const n = width * height, ch = alpha ? 4 : 3, out = new Uint8ClampedArray(n * ch);
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < 3; c++) out[i * ch + c] = Math.fround(rgb[c * n + i] * 255);  // ties to even
    if (alpha) out[i * ch + 3] = alpha[i];
  }
  return new Uint8Array(out.buffer);
}

// ---- onnxruntime-web --------------------------------------------------------------------------------
const ORT_ENTRY = {wasm: "ort.wasm.min.mjs", webgpu: "ort.webgpu.min.mjs"};
const ortModules = {};                                // backend -> Promise<ort> (one per page)

export function defaultThreads() {                    // WASM threads need cross-origin isolation
  return self.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
}
async function loadOrt(base, backend, threads) {
  if (!ortModules[backend]) {
    ortModules[backend] = (async () => {
      const ort = await import(new URL(ORT_ENTRY[backend], base).href);
      ort.env.wasm.wasmPaths = base;                  // read once, at the first session
      ort.env.wasm.numThreads = threads;
      ort.env.wasm.proxy = false;
      ort.env.logLevel = "error";
      return ort;
    })();
  }
  return ortModules[backend];
}
export async function webgpuAvailable() {
  try { return "gpu" in navigator && (await navigator.gpu.requestAdapter()) !== null; } catch (e) { return false; }
}

const NON_FINITE = (what, step) => `the dream's ${what} stopped being a finite number at step ${step} ` +
  "(float32 overflow: the layer weights are too large, or the model's activations overflow at this layer); " +
  "use smaller layer weights or another layer";

export class Dreamer {
  // manifest: the JSON of web.manifest(); base: the URL its relative paths are relative to
  constructor(manifest, base, {threads} = {}) {
    this.manifest = manifest;
    this.base = new URL(base, location.href).href;
    this.threads = threads ?? defaultThreads();
    this.sessions = new Map();                        // `${backend} ${url}` -> Promise<InferenceSession>
    if (!manifest.ort.available) this.unavailable = manifest.ort.reason || "onnxruntime-web is not available";
  }
  url(path) { return new URL(path, this.base).href; }
  async ort(backend) {
    if (this.unavailable) throw new Error(this.unavailable);
    return loadOrt(this.url(this.manifest.ort.base), backend, this.threads);
  }
  async session(path, backend, ep = backend) {
    const key = `${backend} ${ep} ${path}`;
    if (!this.sessions.has(key)) {
      const made = this.ort(backend).then((ort) => ort.InferenceSession.create(this.url(path), {
        executionProviders: ep === "webgpu" ? ["webgpu", "wasm"] : ["wasm"], graphOptimizationLevel: "all",
        logSeverityLevel: 3}));
      made.catch(() => this.sessions.delete(key));
      this.sessions.set(key, made);
      const steps = [...this.sessions.keys()].filter((k) => !k.endsWith(" " + this.manifest.resize));
      for (const k of steps.slice(0, -2)) {           // keep the resize and the last two step graphs
        const old = this.sessions.get(k);
        this.sessions.delete(k);
        old.then((s) => s.release?.()).catch(() => {});
      }
    }
    return this.sessions.get(key);
  }
  async backend(wanted) {                             // what will run: WebGPU only when offered here
    if (wanted === "webgpu" && this.manifest.ort.webgpu && await webgpuAvailable()) return "webgpu";
    return "wasm";
  }
  async resize(ort, backend, x, h, w, nh, nw) {
    if (h === nh && w === nw) return x;
    const s = await this.session(this.manifest.resize, backend, "wasm");
    const out = await s.run({x: new ort.Tensor("float32", x, [1, 3, h, w]),
                             sizes: new ort.Tensor("int64", BigInt64Array.of(1n, 3n, BigInt(nh), BigInt(nw)), [4])});
    return out.y.data;
  }

  // image: a URL, Blob/File or a decoded {width, height, rgb, alpha}; settings: the CLI's names.
  // -> {png: Uint8Array, width, height, seconds, backend, seed, settings, metadata}
  async dream(image, settings = {}, {onProgress, signal, imageName = "IMAGE"} = {}) {
    const s = checkSettings(this.manifest, settings);
    const layer = this.manifest.layers.find((l) => l.name === s.layer);
    const src = image && image.rgb ? image : await decodeImage(image);
    const H = src.height, W = src.width;
    const sizes = octaveSizes(H, W, s.octaves, s.octave_scale, this.manifest.resolver, this.manifest.model.native_size);
    const backend = await this.backend(s.backend);
    const ort = await this.ort(backend);
    const step = await this.session(layer.graph, backend);
    if (sizes.length > 1) await this.session(this.manifest.resize, backend, "wasm");
    const t0 = performance.now();
    const rng = new NumpyRng(s.seed);
    const order = sizes.slice().reverse(), total = order.length * s.steps;
    let done = 0, detail = null, img = null;
    const stepMs = [];                                // each step's run, for benchmarks
    for (let o = 0; o < order.length; o++) {
      const [h, w] = order[o], n = 3 * h * w, last = o === order.length - 1;
      const octaveBase = await this.resize(ort, backend, src.rgb, H, W, h, w);
      if (detail === null) img = octaveBase;
      else {
        const d = await this.resize(ort, backend, detail.x, detail.h, detail.w, h, w);
        img = new Float32Array(n);
        for (let i = 0; i < n; i++) img[i] = Math.min(1, Math.max(0, octaveBase[i] + d[i]));
      }
      for (let i = 0; i < s.steps; i++) {
        if (signal?.aborted) throw new DOMException("the dream was cancelled", "AbortError");
        let dy = 0, dx = 0;
        if (s.jitter) [dy, dx] = rng.integers(-s.jitter, s.jitter + 1, 2);
        const started = performance.now();
        const out = await step.run({
          x: new ort.Tensor("float32", img, [1, 3, h, w]),    // new tensors every run
          shift: new ort.Tensor("int64", BigInt64Array.of(BigInt(((dy % h) + h) % h), BigInt(((dx % w) + w) % w)), [2]),
          step_size: new ort.Tensor("float32", Float32Array.of(s.step_size), [1]),
        });
        const objective = out.objective.data[0];
        if (!Number.isFinite(objective)) throw new Error(NON_FINITE("objective", i + 1));
        img = out.image_out.data;
        stepMs.push(performance.now() - started);
        done += 1;
        onProgress?.({octave: o + 1, octaves: order.length, step: i + 1, steps: s.steps, done, total, objective, size: [h, w]});
      }
      if (!last) {
        const x = new Float32Array(n);
        for (let i = 0; i < n; i++) x[i] = img[i] - octaveBase[i];
        detail = {x, h, w};
      }
    }
    let sum = 0;
    for (let i = 0; i < img.length; i++) sum += img[i];
    if (!Number.isFinite(sum)) throw new Error(NON_FINITE("image", s.steps));
    const seconds = (performance.now() - t0) / 1000;
    const provider = `onnxruntime-web ${this.manifest.ort.version} ${backend}`;
    const output = `dream-${s.seed}.png`;
    const metadata = provenance(this.manifest, s, sizes, provider, imageName, output);
    const png = await encodePng(toPixels(img, src.alpha, W, H), W, H, src.alpha ? 4 : 3, metadata);
    return {png, width: W, height: H, seconds, backend, seed: s.seed, settings: s, metadata, output,
            threads: backend === "wasm" ? this.threads : null, stepMs};
  }
}

function dataUrl(bytes, type = "image/png") {
  return new Promise((ok, fail) => {
    const r = new FileReader();
    r.onload = () => ok(r.result); r.onerror = () => fail(r.error);
    r.readAsDataURL(new Blob([bytes], {type}));
  });
}

// ---- the pages ----------------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function view() {                                     // shared by the site and the server page
  let originalUrl = null, resultUrl = null;
  return {
    status(text, progress) {
      $("status").textContent = text;
      $("progress").hidden = progress == null;
      if (progress != null) $("progress").value = progress;
    },
    error(msg) { $("error").textContent = msg || ""; },
    original(file) {
      if (originalUrl) URL.revokeObjectURL(originalUrl);
      originalUrl = URL.createObjectURL(file);
      const img = new Image();
      img.onload = () => { $("original_info").textContent = `${img.naturalWidth}×${img.naturalHeight}`; };
      img.alt = "the original photo"; img.src = originalUrl;
      $("original_frame").replaceChildren(img);
    },
    result(result) {
      if (resultUrl) URL.revokeObjectURL(resultUrl);
      resultUrl = URL.createObjectURL(new Blob([result.png], {type: "image/png"}));
      const img = $("result");
      img.src = resultUrl; img.hidden = false;
      $("result_placeholder").hidden = true;
      const dl = $("download");
      dl.href = resultUrl; dl.download = result.output; dl.hidden = false;
    },
  };
}
function progressText(p, backend) {
  return `dreaming in this browser (${backend}): octave ${p.octave}/${p.octaves}, step ${p.step}/${p.steps}`;
}
function busy(on) { $("dream").disabled = on; $("cancel").disabled = !on; }

// A static site written by `onnxdream web export`: manifest.json beside the page.
export async function mountSite() {
  const v = view();
  const params = new URLSearchParams(location.search);
  const manifest = await (await fetch(new URL("manifest.json", location.href))).json();
  const threads = params.has("threads") ? Number(params.get("threads")) : undefined;
  const dreamer = new Dreamer(manifest, new URL("manifest.json", location.href), {threads});
  const sel = $("layer");
  for (const l of manifest.layers) sel.add(new Option(l.name, l.name, false, l.name === manifest.default_layer));
  const d = manifest.defaults;
  $("steps").value = d.steps; $("step_size").value = d.step_size;
  $("octaves").value = d.octaves === "auto" ? "" : d.octaves;
  const gpu = manifest.ort.webgpu && await webgpuAvailable();
  const be = $("backend");
  be.querySelector("option[value=webgpu]").disabled = !gpu;
  if (params.get("backend") === "webgpu" && gpu) be.value = "webgpu";
  const sync = () => { $("step_size_value").textContent = `(step ${Number($("step_size").value).toFixed(3)})`; };
  $("step_size").addEventListener("input", sync); sync();
  $("footer").textContent = `onnxdream ${manifest.onnxdream} · ${manifest.model.name}` +
    (manifest.model.license ? ` (${manifest.model.license})` : "") +
    ` · onnxruntime-web ${manifest.ort.version} · ${self.crossOriginIsolated ? `${dreamer.threads} thread(s)` :
      "1 thread (no cross-origin isolation)"}${gpu ? " · WebGPU available" : ""} · your photo stays in this browser`;
  $("image").addEventListener("change", () => { if ($("image").files[0]) v.original($("image").files[0]); });
  let controller = null;
  $("cancel").addEventListener("click", () => controller?.abort());
  $("form").addEventListener("submit", async (ev) => {
    ev.preventDefault(); v.error("");
    const file = $("image").files[0];
    if (!file) { v.error("choose a photo first"); return; }
    controller = new AbortController(); busy(true); v.status("loading the model…", 0);
    try {
      const settings = {layer: sel.value, steps: $("steps").value, step_size: $("step_size").value,
                        octaves: $("octaves").value || "auto", seed: $("seed").value, backend: be.value};
      if (settings.octaves === "auto" && manifest.defaults.octaves !== "auto") settings.octaves = manifest.defaults.octaves;
      const r = await dreamer.dream(file, settings, {signal: controller.signal, imageName: file.name,
        onProgress: (p) => v.status(progressText(p, be.value), p.done / p.total)});
      v.result(r);
      v.status(`done in ${r.seconds.toFixed(1)} s on ${r.backend} (seed ${r.seed})`, 1);
    } catch (e) {
      v.status(""); v.error(e.name === "AbortError" ? "cancelled" : e.message);
    } finally { busy(false); controller = null; }
  });
  return dreamer;
}

// The server's page: "dream in this browser" beside "dream on the server" (app.js does the latter).
// The graph of the chosen model and layer comes from the server (/web/manifest.json, compiled and
// cached there); onnxruntime-web from /web/ort/ when the server was given its files.
export async function mountServer() {
  const v = view(), dreamers = new Map();
  const where = () => document.querySelector("input[name=where]:checked")?.value ?? "server";
  const probe = await (await fetch("/web/manifest.json")).json();
  const browserOption = $("where_browser");
  if (!probe.ort.available) {
    browserOption.disabled = true;
    $("where_note").textContent = probe.ort.reason;
  }
  const gpu = probe.ort.webgpu && await webgpuAvailable();
  $("backend").querySelector("option[value=webgpu]").disabled = !gpu;
  const syncWhere = () => { $("backend_row").hidden = where() !== "browser"; };
  for (const r of document.querySelectorAll("input[name=where]")) r.addEventListener("change", syncWhere);
  syncWhere();
  async function dreamerFor(model, layer, backend) {
    const target = backend === "webgpu" ? "portable" : "default";
    const q = new URLSearchParams({model, target});
    if (layer) q.append("layer", layer);
    const url = `/web/manifest.json?${q}`;
    if (!dreamers.has(url)) {
      const r = await fetch(url);
      const body = await r.json();
      if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
      dreamers.set(url, new Dreamer(body, new URL(url, location.href)));
    }
    return dreamers.get(url);
  }
  let controller = null;
  $("cancel").addEventListener("click", () => controller?.abort());
  $("form").addEventListener("submit", async (ev) => {
    if (where() !== "browser") return;                // app.js dreams on the server
    ev.preventDefault(); v.error("");
    const file = $("image").files[0];
    if (!file) { v.error("choose a photo first"); return; }
    controller = new AbortController(); busy(true); v.status("preparing the graph on the server…", 0);
    try {
      const backend = $("backend").value;
      const dreamer = await dreamerFor($("model").value, $("layer").value, backend);
      const settings = {steps: $("steps").value, step_size: $("step_size").value, octaves: $("octaves").value,
                        seed: $("seed").value, backend};
      v.status("loading the model into this browser…", 0);
      const r = await dreamer.dream(file, settings, {signal: controller.signal, imageName: file.name,
        onProgress: (p) => v.status(progressText(p, backend), p.done / p.total)});
      v.result(r);
      v.status(`done in ${r.seconds.toFixed(1)} s in this browser on ${r.backend} (seed ${r.seed})`, 1);
    } catch (e) {
      v.status(""); v.error(e.name === "AbortError" ? "cancelled" : e.message);
    } finally { busy(false); controller = null; }
  });
  window.onnxdream = {dreamerFor, Dreamer};
}

if (typeof document !== "undefined") {
  const kind = document.documentElement.dataset.onnxdream;
  if (kind === "site") {
    const ready = mountSite();
    window.onnxdream = {
      ready,
      // for automation: settings use the CLI's names (layer, steps, octaves, octave_scale, step_size, jitter, seed)
      async dream(imageUrl, settings = {}) {
        const r = await (await ready).dream(imageUrl, settings);
        return {png: await dataUrl(r.png), seconds: r.seconds, backend: r.backend, seed: r.seed,
                width: r.width, height: r.height, threads: r.threads, step_ms: r.stepMs,
                metadata: Object.fromEntries(r.metadata)};
      },
      octaveSizes, NumpyRng, pyFloat,
    };
    ready.catch((e) => { const el = $("error"); if (el) el.textContent = "cannot start: " + e.message; });
  } else if (kind === "server") {
    mountServer().catch((e) => { const el = $("where_note"); if (el) el.textContent = "in-browser dreams unavailable: " + e.message; });
  }
}
