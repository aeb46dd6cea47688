// The cots search page: plain JavaScript over the public API (no build step, no framework).
// The search (mode, query text or item id, page, results per page, filter) lives in the URL's
// query string, so a search can be shared and the browser's back button steps through them.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "cots-api-key";
// Each mode: what the query is and which side of the index answers.
const MODES = {
  "text-to-image": { input: "text", side: "image" },
  "text-to-text": { input: "text", side: "text" },
  "image-to-image": { input: "image", side: "image" },
  "image-to-text": { input: "image", side: "text" },
  // Videos are items of the image side (media "video"): the video endpoints answer these.
  "text-to-video": { input: "text", side: "video" },
  "video-to-text": { input: "video", side: "text" },
};
const THUMBNAIL = 256;

const state = { mode: "text-to-image", q: "", id: "", page: 1, k: 12, filter: "" };
const FILTER_SYNTAX = '{"field": value}, {"field": {"in": [a, b]}}, {"field": {"gte": 1, "lt": 5}}';
let fields = {}; // side -> {metadata field: type}, from /info: the filter box names them
let file = null; // an uploaded query image: searched, but not part of a shared URL
let clip = null; // an uploaded query video, likewise

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

// -- the URL <-> the state <-> the form --------------------------------------------------------

function readUrl() {
  const params = new URLSearchParams(location.search);
  state.mode = MODES[params.get("mode")] ? params.get("mode") : "text-to-image";
  state.q = params.get("q") || "";
  state.id = params.get("id") || "";
  state.page = Math.max(1, parseInt(params.get("page"), 10) || 1);
  state.k = Math.max(1, parseInt(params.get("k"), 10) || 12);
  state.filter = params.get("filter") || "";
}

function writeUrl(replace) {
  const params = new URLSearchParams({ mode: state.mode });
  if (state.id) params.set("id", state.id);
  else if (MODES[state.mode].input === "text" && state.q) params.set("q", state.q);
  if (state.page > 1) params.set("page", String(state.page));
  params.set("k", String(state.k));
  if (state.filter) params.set("filter", state.filter);
  const url = `${location.pathname}?${params}`;
  if (replace) history.replaceState(null, "", url); else history.pushState(null, "", url);
}

function readForm() {
  state.q = $("text-input").value;
  state.k = Math.max(1, parseInt($("k-input").value, 10) || 12);
  state.filter = $("filter-input").value.trim();
}

function showState() {
  for (const tab of document.querySelectorAll("#modes [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === state.mode));
  }
  const input = MODES[state.mode].input;
  $("text-query").hidden = input !== "text" || Boolean(state.id);
  $("image-query").hidden = input !== "image" || Boolean(state.id);
  $("video-query").hidden = input !== "video" || Boolean(state.id);
  $("text-input").value = state.q;
  $("k-input").value = state.k;
  $("filter-input").value = state.filter;
  showFilterHint();
  showQuery();
}

// The filter box's hint: this index's own fields on the side the mode searches (an example
// with a field the index lacks would only ever answer 422).
function showFilterHint() {
  const side = MODES[state.mode].side === "video" ? "image" : MODES[state.mode].side;
  const types = fields[side] || {};
  const names = Object.keys(types);
  const input = $("filter-input");
  if (!names.length) {
    input.placeholder = "no metadata to filter on";
    input.title = "this index's items have no metadata fields";
    return;
  }
  const first = names.includes("folder") ? "folder" : names[0];
  const value = { number: "{\"gte\": …}", bool: "true", list: "\"…\"" }[types[first]] || "\"…\"";
  input.placeholder = `{"${first}": ${value}} · fields: ${names.join(", ")}`;
  input.title = `metadata filter (JSON) on ${names.map((n) => `${n} (${types[n]})`).join(", ")}: ` +
    FILTER_SYNTAX + ("folder" in types ? '; {"folder": "a"} also finds a/b/...' : "");
}

// The query as searched: a preview of the uploaded image, or the item of "more like this".
function showQuery() {
  const preview = $("preview");
  preview.hidden = true;
  preview.removeAttribute("src");
  if (state.id && MODES[state.mode].side === "image") {
    setImage(preview, `images/${encodeURIComponent(state.id)}?size=${THUMBNAIL}`);
    preview.hidden = false;
  } else if (!state.id && MODES[state.mode].input === "image" && file) {
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  }
  $("like").hidden = !state.id;
  $("like-id").textContent = state.id;
  $("query-shown").hidden = preview.hidden && !state.id;
}

// -- results -------------------------------------------------------------------------------------

function clear() {
  $("error").hidden = true;
  $("grid").replaceChildren();
  $("texts").replaceChildren();
  $("videos").replaceChildren();
  $("summary").textContent = "";
  $("pager").hidden = true;
}

function showError(err) {
  $("error").textContent = err.message;
  $("error").hidden = false;
}

function moreLike(mode, id) {
  return el("button", {
    type: "button",
    className: "link like",
    textContent: "more like this",
    onclick: () => {
      Object.assign(state, { mode, id, page: 1 });
      showState();
      run("push");
      window.scrollTo(0, 0);
    },
  });
}

function metaLine(meta) {
  const text = Object.keys(meta || {}).length ? JSON.stringify(meta) : "";
  return el("div", { className: "meta", textContent: text, title: text });
}

// An item's id, whole: on hover (title), selectable, and copied by its button (long ids of
// photo folders do not fit a card).
function idLine(id) {
  const text = el("span", { className: "id-text", textContent: id, title: id });
  const copy = el("button", { type: "button", className: "link copy", textContent: "copy id",
    title: `copy the id ${id}` });
  copy.addEventListener("click", () => copyText(id, text, copy));
  return el("div", { className: "id" }, [text, copy]);
}

async function copyText(text, node, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch { // no clipboard API (plain http on another host): select it and copy that way
    const range = document.createRange();
    range.selectNodeContents(node);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand("copy");
  }
  button.textContent = "copied";
  setTimeout(() => { button.textContent = "copy id"; }, 1500);
}

function score(hit) {
  return el("span", { className: "score", textContent: `#${hit.rank} · score ${hit.score.toFixed(3)}` });
}

function showImages(hits) {
  for (const hit of hits) {
    const img = el("img", { alt: hit.captions[0] || hit.id, loading: "lazy" });
    setImage(img, hit.thumbnail_url);
    const caption = el("figcaption", {}, [
      ...(hit.captions.length ? [el("div", { className: "caption", textContent: hit.captions[0] })] : []),
      idLine(hit.id),
      el("div", {}, [score(hit)]),
      metaLine(hit.meta),
      moreLike("image-to-image", hit.id),
    ]);
    const title = [hit.id, ...hit.captions].join("\n");
    const card = el("figure", { className: "card", title }, [img, caption]);
    card.dataset.id = hit.id;
    $("grid").append(card);
  }
}

// A video hit: its keyframe strip (the sampled frames in time order), captions, score, meta.
function showVideos(hits) {
  for (const hit of hits) {
    const strip = el("img", { className: "strip", alt: hit.captions[0] || hit.id, loading: "lazy" });
    setImage(strip, hit.url);
    const link = el("a", { href: hit.video_url, textContent: "video", target: "_blank" });
    const item = el("li", { value: hit.rank, className: "video-card", title: hit.id }, [
      strip,
      el("div", { className: "caption", textContent: hit.captions[0] || hit.id }),
      idLine(hit.id),
      el("div", {}, [score(hit), el("span", { className: "muted" }, [" · ", link,
        ` · ${hit.keyframe_urls.length} keyframes`])]),
      metaLine(hit.meta),
    ]);
    item.dataset.id = hit.id;
    $("videos").append(item);
  }
}

function showTexts(hits) {
  for (const hit of hits) {
    const parts = [];
    if (hit.thumbnail_url) {
      const img = el("img", { alt: hit.image_id });
      setImage(img, hit.thumbnail_url);
      parts.push(img);
    }
    parts.push(
      el("span", { className: "text", textContent: hit.text }),
      score(hit),
      moreLike("text-to-text", hit.id),
    );
    const item = el("li", { value: hit.rank, title: hit.id },
      [el("div", { className: "hit" }, parts), metaLine(hit.meta)]);
    item.dataset.id = hit.id;
    $("texts").append(item);
  }
}

function showPage(body) {
  const count = body.hits.length;
  $("summary").textContent =
    `${count} results in ${body.took_ms.toFixed(1)} ms · page ${state.page} · index ${body.index_version}`;
  $("page-label").textContent = `page ${state.page}`;
  $("prev").disabled = state.page <= 1;
  $("next").disabled = count < state.k;
  $("pager").hidden = state.page <= 1 && count < state.k;
}

// -- searching -----------------------------------------------------------------------------------

function missingQuery() {
  if (state.id) return "";
  if (MODES[state.mode].input === "text") return state.q ? "" : "type a query first";
  if (MODES[state.mode].input === "video") return clip ? "" : "choose a video first";
  return file ? "" : "choose an image first";
}

function request() {
  let filter;
  if (state.filter) {
    try { filter = JSON.parse(state.filter); } catch { throw new Error("filter: not valid JSON"); }
  }
  const page = { k: state.k, offset: (state.page - 1) * state.k };
  if (state.id || MODES[state.mode].input === "text") {
    const query = state.id ? { id: state.id } : { text: state.q };
    return {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(Object.assign(query, page, { filter })),
    };
  }
  const form = new FormData();
  if (MODES[state.mode].input === "video") form.append("video", clip, clip.name);
  else form.append("image", file, file.name);
  form.append("k", String(page.k));
  form.append("offset", String(page.offset));
  if (filter !== undefined) form.append("filter", JSON.stringify(filter));
  return { method: "POST", headers: headers(), body: form };
}

let latest = 0; // the newest search: an older one answering late is not shown

// Search with the state; `how` ("push", "replace" or null) records it in the URL first.
async function run(how) {
  const mine = ++latest;
  clear();
  const button = $("search-submit");
  const missing = missingQuery();
  button.disabled = !missing;
  if (missing) {
    if (how) showError(new Error(missing));
    return;
  }
  if (how) writeUrl(how === "replace");
  try {
    const body = await call(`search/${state.mode}`, request());
    if (mine !== latest) return;
    const side = MODES[state.mode].side;
    if (side === "image") showImages(body.hits);
    else if (side === "video") showVideos(body.hits);
    else showTexts(body.hits);
    showPage(body);
  } catch (err) {
    if (mine === latest) showError(err);
  } finally {
    if (mine === latest) button.disabled = false;
  }
}

// -- events --------------------------------------------------------------------------------------

for (const tab of document.querySelectorAll("#modes [role=tab]")) {
  tab.addEventListener("click", () => {
    readForm();
    Object.assign(state, { mode: tab.dataset.mode, id: "", page: 1 });
    showState();
    if (!missingQuery()) run("push"); else clear();
  });
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  readForm();
  state.page = 1;
  run("push");
});

$("prev").addEventListener("click", () => { state.page -= 1; run("push"); });
$("next").addEventListener("click", () => { state.page += 1; run("push"); });
$("like-clear").addEventListener("click", () => { state.id = ""; showState(); });

$("image-input").addEventListener("change", () => {
  file = $("image-input").files[0] || null;
  state.id = "";
  showQuery();
});

$("video-input").addEventListener("change", () => {
  clip = $("video-input").files[0] || null;
  state.id = "";
  showQuery();
});

for (const [zone, input] of [["image-query", "image-input"], ["video-query", "video-input"]]) {
  const drop = $(zone);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    $(input).files = e.dataTransfer.files;
    $(input).dispatchEvent(new Event("change"));
  });
}

window.addEventListener("popstate", () => {
  readUrl();
  showState();
  run(null);
});

$("key-input").value = localStorage.getItem(KEY) || "";
$("key-input").addEventListener("change", (e) => {
  if (e.target.value) localStorage.setItem(KEY, e.target.value); else localStorage.removeItem(KEY);
  loadInfo();
});

// Tabs whose side the index does not hold are disabled (the API would answer 404 side_absent).
async function loadInfo() {
  try {
    const info = await call("info", { headers: headers() });
    $("k-input").max = info.limits.max_k;
    fields = Object.fromEntries(Object.entries(info.index.sides || {})
      .map(([side, s]) => [side, (s && s.fields) || {}]));
    showFilterHint();
    if (!info.ready) {
      $("status").textContent = "loading the index…";
      setTimeout(loadInfo, 1000);
      return;
    }
    const video = await call("info/video", { headers: headers() });
    const images = info.gallery.images - video.videos; // videos are items of the image side
    const counts = [images || !video.videos ? `${images} images` : "",
      video.videos ? `${video.videos} videos` : "", `${info.gallery.texts} texts`];
    $("status").textContent =
      `${counts.filter(Boolean).join(" · ")} · ` +
      `index ${info.index.version} · bundle ${info.bundle.bundle_id}`;
    for (const tab of document.querySelectorAll("#modes [role=tab]")) {
      const mode = MODES[tab.dataset.mode];
      const needsVideo = mode.side === "video" || mode.input === "video";
      const side = mode.side === "video" ? "image" : mode.side;
      tab.disabled = !(side in info.index.sides) || (needsVideo && !video.videos);
    }
  } catch (err) {
    $("status").textContent = `not connected (${err.message})`;
  }
}

readUrl();
showState();
run(null);
loadInfo();
