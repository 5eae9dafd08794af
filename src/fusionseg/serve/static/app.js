// fusionseg demo page: no framework, no CDN. Talks to POST /v1/segment and draws the result itself.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { blob: null, name: "", result: null, base: null, labels: null, scores: null, urls: [], pinned: false };

function showError(msg) {
  const e = $("error");
  e.textContent = msg;
  e.hidden = !msg;
}

function setStatus(msg) { $("status").textContent = msg; }

function stem(name) { return (name || "image").replace(/\.[^.]*$/, "") || "image"; }

function pct(f) {
  if (f === 0) return "0%";
  const p = 100 * f;
  return p < 0.1 ? "<0.1%" : p.toFixed(1) + "%";
}

function chooseImage(blob, name, exampleButton) {
  state.blob = blob;
  state.name = name;
  document.querySelectorAll(".examples button").forEach((b) => b.classList.toggle("chosen", b === exampleButton));
  const img = $("preview");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
  showError("");
}

async function loadModelInfo() {
  try {
    const r = await fetch("/v1/model");
    const m = await r.json();
    if (!r.ok) throw new Error(m.error || "HTTP " + r.status);
    $("model-info").textContent = `model: ${m.model} · ${m.image_encoder.name} + ${m.text_encoder.name} · preset ` +
      `${m.preset} · ${m.image_size} px · trained on ${m.classes_seen_in_training.length} names ` +
      `(e.g. ${m.classes_seen_in_training.slice(0, 8).join(", ")}, …)`;
    $("model-info").title = "names seen in training: " + m.classes_seen_in_training.join(", ");
    // empty: the model's own decision (relative for the shipped model), as the CLI and the API decide
    $("threshold").value = "";
    $("threshold").placeholder = m.decision === "threshold" ? String(m.threshold) : m.decision;
    $("threshold").title = `empty: the model's own decision (${m.decision}); a number T: a pixel takes its best ` +
      `name when that name's score reaches T (the model's T is ${m.threshold})`;
  } catch (err) {
    $("model-info").textContent = "could not read /v1/model: " + err.message;
  }
}

async function loadExamples() {
  try {
    const r = await fetch("/v1/examples");
    const items = await r.json();
    for (const it of items) {
      const b = document.createElement("button");
      b.type = "button";
      b.title = `${it.title} — ${it.credit}`;
      b.dataset.file = it.file;
      const im = document.createElement("img");
      im.src = it.url;
      im.alt = it.title;
      const cap = document.createElement("span");
      cap.textContent = it.title;
      b.append(im, cap);
      b.addEventListener("click", async () => {
        try {
          const res = await fetch(it.url);
          if (!res.ok) throw new Error("HTTP " + res.status);
          chooseImage(await res.blob(), it.file, b);
          $("file").value = "";
          if (!$("classes").value.trim()) $("classes").value = it.classes;
        } catch (err) {
          showError(`Could not load the example ${it.file}: ${err.message}`);
        }
      });
      $("examples").append(b);
    }
  } catch (err) {
    // examples are optional; the upload still works
  }
}

function decodePng(b64) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => {
      const c = document.createElement("canvas");
      c.width = im.naturalWidth;
      c.height = im.naturalHeight;
      const ctx = c.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(im, 0, 0);
      resolve(ctx.getImageData(0, 0, c.width, c.height));
    };
    im.onerror = () => reject(new Error("the server sent a PNG the browser cannot decode"));
    im.src = "data:image/png;base64," + b64;
  });
}

function b64Blob(b64, type) {
  const bin = atob(b64);
  const a = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
  return new Blob([a], { type });
}

async function baseImage(W, H) {
  // The picture as the browser decodes it, at the size the server reports (EXIF orientation applied by both).
  const c = document.createElement("canvas");
  c.width = W;
  c.height = H;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#808080";
  ctx.fillRect(0, 0, W, H);
  try {
    const bmp = await createImageBitmap(state.blob);
    ctx.drawImage(bmp, 0, 0, W, H);
    bmp.close();
  } catch (err) {
    setStatus("(the browser cannot show this image format; classes drawn on grey)");
  }
  return ctx.getImageData(0, 0, W, H);
}

function hexRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }

async function render(res) {
  const W = res.width, H = res.height;
  const [base, lab, sc] = await Promise.all([baseImage(W, H), decodePng(res.label_png),
    res.score_png ? decodePng(res.score_png) : Promise.resolve(null)]);
  // Colour -> label: the label PNG is a palette image whose colours are the per_class colours (0 = black).
  const byColour = new Map();
  for (const c of res.per_class) {
    const [r, g, b] = hexRgb(c.color);
    byColour.set((r << 16) | (g << 8) | b, c.label);
  }
  const n = W * H;
  const labels = new Uint16Array(n);
  for (let i = 0, j = 0; i < n; i++, j += 4) {
    labels[i] = byColour.get((lab.data[j] << 16) | (lab.data[j + 1] << 8) | lab.data[j + 2]) || 0;
  }
  let scores = null;
  if (sc) {
    scores = new Uint8Array(n);
    for (let i = 0, j = 0; i < n; i++, j += 4) scores[i] = sc.data[j];
  }
  state.base = base;
  state.labels = labels;
  state.scores = scores;
  state.result = res;
  composite();
  legendAndChart(res);
  downloads(res);
  $("result").hidden = false;
  $("pixel-info").textContent = "hover or click the picture to read a pixel";
  $("pixel-info").classList.remove("pinned");
  state.pinned = false;
}

function composite() {
  const res = state.result, base = state.base, labels = state.labels;
  const a = Number($("opacity").value) / 100;
  const colours = [[0, 0, 0]];
  for (const c of res.per_class) colours[c.label] = hexRgb(c.color);
  const out = new ImageData(base.width, base.height);
  const s = base.data, d = out.data;
  for (let i = 0, j = 0; i < labels.length; i++, j += 4) {
    const k = labels[i];
    if (k > 0) {
      const col = colours[k];
      d[j] = s[j] * (1 - a) + col[0] * a;
      d[j + 1] = s[j + 1] * (1 - a) + col[1] * a;
      d[j + 2] = s[j + 2] * (1 - a) + col[2] * a;
    } else {
      d[j] = s[j]; d[j + 1] = s[j + 1]; d[j + 2] = s[j + 2];
    }
    d[j + 3] = 255;
  }
  const cv = $("overlay");
  cv.width = base.width;
  cv.height = base.height;
  cv.getContext("2d").putImageData(out, 0, 0);
}

function legendAndChart(res) {
  const rows = [...res.per_class].sort((x, y) => y.area_fraction - x.area_fraction || x.label - y.label);
  const ul = $("legend");
  ul.replaceChildren();
  for (const c of rows) {
    const li = document.createElement("li");
    li.dataset.name = c.name;
    if (c.area_fraction === 0) li.classList.add("absent");
    const sw = document.createElement("span");
    sw.className = "sw";
    sw.style.background = c.color;
    const nm = document.createElement("span");
    nm.className = "name";
    nm.textContent = c.name;
    const p = document.createElement("span");
    p.className = "pct";
    p.textContent = pct(c.area_fraction) + (c.mean_score == null ? "" : ` · score ${c.mean_score.toFixed(2)}`);
    li.append(sw, nm, p);
    ul.append(li);
  }
  const chart = $("chart");
  chart.replaceChildren();
  const top = Math.max(res.none_fraction, ...rows.map((c) => c.area_fraction), 1e-9);
  const addRow = (name, frac, colour) => {
    const row = document.createElement("div");
    row.className = "row";
    const nm = document.createElement("span");
    nm.className = "name";
    nm.textContent = name;
    nm.title = name;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = (100 * frac / top).toFixed(2) + "%";
    bar.style.background = colour;
    track.append(bar);
    const v = document.createElement("span");
    v.className = "val";
    v.textContent = pct(frac);
    row.append(nm, track, v);
    chart.append(row);
  };
  for (const c of rows) addRow(c.name, c.area_fraction, c.color);
  addRow("none of these", res.none_fraction, "#9aa0a6");
  $("timing").textContent = `${res.width} × ${res.height} px · ` +
    (res.background ? "plain arg-max" : res.decision === "threshold" ? `threshold ${res.threshold}`
      : `${res.decision} decision`) + ` · ${res.seconds.toFixed(2)} s on the server`;
}

function downloads(res) {
  for (const u of state.urls) URL.revokeObjectURL(u);
  state.urls = [];
  const s = stem(state.name);
  const lab = URL.createObjectURL(b64Blob(res.label_png, "image/png"));
  state.urls.push(lab);
  $("download-label").href = lab;
  $("download-label").download = s + "_labels.png";
  if (res.overlay_png) {
    const ov = URL.createObjectURL(b64Blob(res.overlay_png, "image/png"));
    state.urls.push(ov);
    $("download-overlay").href = ov;
    $("download-overlay").download = s + "_overlay.png";
  }
}

function readPixel(ev) {
  if (!state.labels) return null;
  const cv = $("overlay");
  const r = cv.getBoundingClientRect();
  const x = Math.floor((ev.clientX - r.left) * cv.width / r.width);
  const y = Math.floor((ev.clientY - r.top) * cv.height / r.height);
  if (x < 0 || y < 0 || x >= cv.width || y >= cv.height) return null;
  const i = y * cv.width + x;
  const k = state.labels[i];
  const score = state.scores ? (state.scores[i] / 255).toFixed(2) : "?";
  const name = k > 0 ? state.result.per_class[k - 1].name : "none of these";
  return k > 0 ? `(${x}, ${y}) ${name} · score ${score}` : `(${x}, ${y}) none of these · best score ${score}`;
}

$("overlay").addEventListener("mousemove", (ev) => {
  if (state.pinned) return;
  const t = readPixel(ev);
  if (t) $("pixel-info").textContent = t;
});
$("overlay").addEventListener("click", (ev) => {
  const t = readPixel(ev);
  if (!t) return;
  state.pinned = !state.pinned || $("pixel-info").dataset.text !== t;
  $("pixel-info").textContent = state.pinned ? t + "  (pinned: click again to release)" : t;
  $("pixel-info").dataset.text = t;
  $("pixel-info").classList.toggle("pinned", state.pinned);
});
$("opacity").addEventListener("input", () => { if (state.result) composite(); });

$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (f) chooseImage(f, f.name, null);
});

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  if (!state.blob) { showError("Choose an image file or one of the examples first."); return; }
  const classes = $("classes").value;
  if (!classes.trim()) { showError("Type at least one class name, e.g. “cat, sofa, potted plant”."); return; }
  const fd = new FormData();
  fd.append("image", state.blob, state.name || "image");
  fd.append("classes", classes);
  if ($("threshold").value.trim() !== "") fd.append("threshold", $("threshold").value);
  fd.append("overlay", "true");
  fd.append("scores", "true");
  const btn = $("segment");
  btn.disabled = true;
  setStatus("Segmenting…");
  const t0 = performance.now();
  try {
    let r;
    try {
      r = await fetch("/v1/segment", { method: "POST", body: fd });
    } catch (err) {
      throw new Error("Cannot reach the server (" + err.message + "). Is fusionseg serve still running?");
    }
    let body = null;
    try { body = await r.json(); } catch (err) { body = null; }
    if (!r.ok) {
      let msg = (body && body.error) || `The server answered HTTP ${r.status}.`;
      if (r.status === 503 && r.headers.get("Retry-After")) msg += ` (retry after ${r.headers.get("Retry-After")} s)`;
      throw new Error(msg);
    }
    if (!body) throw new Error("The server's answer was not JSON.");
    await render(body);
    setStatus(`Done in ${((performance.now() - t0) / 1000).toFixed(2)} s.`);
  } catch (err) {
    setStatus("");
    showError(err.message);
  } finally {
    btn.disabled = false;
  }
});

loadModelInfo();
loadExamples();
