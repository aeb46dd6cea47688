// The cots search page: plain JavaScript over the public API (no build step, no framework).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "cots-api-key";

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = localStorage.getItem(KEY);
  if (key) h["X-API-Key"] = key;
  return h;
}

async function call(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(`${response.status}: ${body.detail || "request failed"}`);
  return body;
}

// With an API key, <img src> cannot send it: fetch the bytes and show a blob URL instead.
function setImage(img, url) {
  if (!localStorage.getItem(KEY)) { img.src = url; return; }
  fetch(url, { headers: headers() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(r.status)))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { img.alt = "image unavailable"; });
}

function el(tag, props, children) {
  const node = Object.assign(document.createElement(tag), props || {});
  for (const child of children || []) node.append(child);
  return node;
}

function clear() {
  $("error").hidden = true;
  $("grid").replaceChildren();
  $("captions").replaceChildren();
  $("summary").textContent = "";
}

function showError(err) {
  $("error").textContent = err.message;
  $("error").hidden = false;
}

function summarise(body) {
  const count = body.results.reduce((n, r) => n + r.hits.length, 0);
  $("summary").textContent =
    `${count} results in ${body.took_ms.toFixed(1)} ms · index ${body.index_version}`;
}

function showImages(body) {
  for (const hit of body.hits) {
    const img = el("img", { alt: hit.captions[0] || hit.id, loading: "lazy" });
    setImage(img, hit.thumbnail_url);
    const caption = el("figcaption", {}, [
      el("div", { className: "caption", textContent: hit.captions[0] || hit.id }),
      el("div", { className: "score", textContent: `#${hit.rank} · score ${hit.score.toFixed(3)}` }),
    ]);
    $("grid").append(el("figure", { className: "card", title: hit.captions.join("\n") }, [img, caption]));
  }
}

function showCaptions(body) {
  for (const result of body.results) {
    if (body.results.length > 1) $("captions").append(el("h3", { textContent: result.query }));
    for (const hit of result.hits) {
      const img = el("img", { alt: hit.image_id });
      setImage(img, hit.thumbnail_url);
      $("captions").append(el("li", {}, [el("div", { className: "hit" }, [
        img,
        el("span", { className: "text", textContent: hit.text }),
        el("span", { className: "score", textContent: `score ${hit.score.toFixed(3)}` }),
      ])]));
    }
  }
}

async function busy(button, work) {
  button.disabled = true;
  clear();
  try { await work(); } catch (err) { showError(err); } finally { button.disabled = false; }
}

function k() { return Math.max(1, parseInt($("k-input").value, 10) || 10); }

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("text-submit"), async () => {
    const body = await call("search/text-to-image", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ text: $("text-input").value, k: k() }),
    });
    summarise(body);
    showImages(body);
  });
});

$("image-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("image-submit"), async () => {
    const form = new FormData();
    for (const file of $("image-input").files) form.append("image", file, file.name);
    form.append("k", String(k()));
    const body = await call("search/image-to-text", { method: "POST", headers: headers(), body: form });
    summarise(body);
    showCaptions(body);
  });
});

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  $("image-input").files = e.dataTransfer.files;
});

$("key-input").value = localStorage.getItem(KEY) || "";
$("key-input").addEventListener("change", (e) => {
  if (e.target.value) localStorage.setItem(KEY, e.target.value); else localStorage.removeItem(KEY);
  loadInfo();
});

async function loadInfo() {
  try {
    const info = await call("info", { headers: headers() });
    $("k-input").max = info.limits.max_k;
    $("status").textContent = info.ready
      ? `${info.gallery.images} images · ${info.gallery.captions} captions · ` +
        `index ${info.index.version} · bundle ${info.bundle.bundle_id}`
      : "loading the index…";
    if (!info.ready) setTimeout(loadInfo, 1000);
  } catch (err) {
    $("status").textContent = `not connected (${err.message})`;
  }
}
loadInfo();
