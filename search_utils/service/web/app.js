// The search page: plain DOM, no framework, no build step.
// A search by an indexed image lives in the URL (/?id=ROW&n=N&metric=M), so it
// can be shared, reloaded and walked with back/forward; an uploaded image
// can't be put in a URL, so it is kept in this tab only (back/forward still
// return to it until the page is reloaded).
"use strict";

const MAX_RESULTS = 100; // the API's limit
const DEFAULT_COUNT = 10;
const SAMPLE_SIZE = 24;

const $ = (id) => document.getElementById(id);
const settings = { n: DEFAULT_COUNT, metric: "chi2", metricFromUrl: false };
const uploads = new Map(); // history key -> File: what back/forward return to
let nextUpload = 1;
let current = null; // the query on screen or on its way: {id} or {upload, file}; null: the sample
let running = null; // AbortController of the search in flight: a newer search cancels it
let preview = null; // {file, url}: the blob: URL of the shown upload, revoked when replaced
let renders = 0;

// -- talking to the service ---------------------------------------------------

// JSON from the API, or an Error holding the API's one-line message.
async function api(path, options = {}) {
  let response, body = null;
  try {
    response = await fetch(path, options);
    body = await response.json();
  } catch (error) {
    if (error.name === "AbortError") throw error;
    if (!response) throw new Error("the search service did not answer; is it still running?");
  }
  if (!response.ok || body === null) {
    throw new Error(body && typeof body.error === "string" ? body.error : `the service answered HTTP ${response.status}`);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("main").setAttribute("aria-busy", String(busy));
}

// -- the URL ----------------------------------------------------------------

function pageUrl(id) {
  const params = new URLSearchParams();
  if (id !== undefined) params.set("id", id);
  params.set("n", settings.n);
  params.set("metric", settings.metric);
  return `/?${params}`;
}

function clampCount(value) {
  const n = Number.parseInt(value, 10);
  return Number.isNaN(n) ? DEFAULT_COUNT : Math.min(MAX_RESULTS, Math.max(1, n));
}

// Settings from the URL; the id (if any) is left for the API to judge, so a
// bad one gets the API's own message.
function readUrl() {
  const params = new URLSearchParams(location.search);
  settings.n = clampCount(params.get("n"));
  settings.metricFromUrl = params.has("metric");
  if (settings.metricFromUrl) settings.metric = params.get("metric");
  $("n").value = settings.n;
  $("metric").value = settings.metric;
  return params.has("id") ? params.get("id") : null;
}

// Show what the URL (and, for an upload, the history entry) says.
function route() {
  const id = readUrl();
  const key = history.state && history.state.upload;
  if (id !== null) search({ id }, "none");
  else if (uploads.has(key)) search({ upload: key, file: uploads.get(key) }, "none");
  else showSample();
}

// -- searching --------------------------------------------------------------

// how: "push" (a new query: a new history entry), "replace" (new settings
// for the same query) or "none" (the URL already says it: load, back/forward).
async function search(query, how) {
  if (running) running.abort();
  const controller = new AbortController();
  running = controller;
  current = query;
  const entry = "id" in query ? [{ id: query.id }, pageUrl(query.id)] : [{ upload: query.upload }, pageUrl()];
  if (how === "push") history.pushState(entry[0], "", entry[1]);
  if (how === "replace") history.replaceState(entry[0], "", entry[1]);
  showError("");
  setStatus("Searching…");
  setBusy(true);
  const params = new URLSearchParams({ n: settings.n, metric: settings.metric });
  try {
    let found;
    if ("id" in query) {
      params.set("id", query.id);
      found = await api(`/api/search?${params}`, { signal: controller.signal });
    } else {
      const form = new FormData();
      form.append("image", query.file, query.file.name || "pasted image");
      found = await api(`/api/search?${params}`, { method: "POST", body: form, signal: controller.signal });
    }
    showResults(query, found);
  } catch (error) {
    if (error.name === "AbortError") return; // a newer search took over
    // The URL names this failed query: old results on screen would not be its.
    showSample();
    showError(error.message);
  } finally {
    if (running === controller) {
      running = null;
      setBusy(false);
    }
  }
}

function searchFile(file) {
  const key = nextUpload++;
  uploads.set(key, file);
  search({ upload: key, file }, "push");
}

// Settings changed: the same query again, with them.
function rerun() {
  for (const link of document.querySelectorAll("a[data-id]")) link.href = pageUrl(link.dataset.id);
  if (current) search(current, "replace");
  else history.replaceState(history.state, "", pageUrl());
}

// -- drawing ----------------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // never innerHTML: paths may hold any character
  return node;
}

// A thumbnail that links to the search by that image.
function tile(item, testid) {
  const link = element("a", "tile");
  link.href = pageUrl(item.id);
  link.dataset.id = item.id;
  link.dataset.testid = testid;
  link.title = item.path;
  const img = element("img");
  img.src = `/api/thumbnails/${item.id}`;
  img.alt = item.path;
  img.width = img.height = 256; // reserves the square before it loads
  img.decoding = "async";
  img.draggable = false; // dragging a tile onto the page is not an upload
  link.append(img);
  const li = element("li");
  li.append(link);
  return li;
}

function resultTile(hit) {
  const li = tile(hit, "result");
  const link = li.firstChild;
  link.dataset.distance = hit.distance;
  const facts = element("span", "facts");
  facts.append(element("span", "rank", `#${hit.rank}`), element("span", "distance", hit.distance.toFixed(4)));
  link.append(facts, element("span", "path", hit.path));
  if (hit.copies.length) {
    const noun = hit.copies.length === 1 ? "copy" : "copies";
    const copies = element("span", "copies", `+${hit.copies.length} ${noun}`);
    copies.title = hit.copies.join("\n");
    link.append(copies);
  }
  return li;
}

function sampleTile(item) {
  const li = tile(item, "sample-tile");
  li.firstChild.append(element("span", "path", item.path));
  return li;
}

function showResults(query, found) {
  const img = $("query-preview");
  const original = $("query-original");
  if ("file" in query) {
    if (!preview || preview.file !== query.file) {
      if (preview) URL.revokeObjectURL(preview.url);
      preview = { file: query.file, url: URL.createObjectURL(query.file) };
    }
    img.src = preview.url;
    original.hidden = true;
  } else {
    img.src = `/api/thumbnails/${found.query_id}`;
    original.href = `/api/images/${found.query_id}`;
    original.hidden = false;
  }
  img.alt = found.query;
  $("query-name").textContent = found.query;
  // A clicked tile is about to go: keep the keyboard user's place at the new results.
  const lostFocus = document.activeElement && document.activeElement.matches("a[data-id]");
  const grid = $("results");
  grid.replaceChildren(...found.results.map(resultTile));
  grid.dataset.queryId = found.query_id ?? "";
  grid.dataset.metric = found.metric;
  grid.dataset.search = ++renders; // tests wait for a new value
  const count = found.results.length;
  setStatus(`${count} ${count === 1 ? "image" : "images"} nearest to ${found.query} (${found.metric})`);
  $("search").hidden = false;
  $("browse").hidden = true;
  if (lostFocus) $("results-heading").focus();
}

function showSample() {
  if (running) running.abort();
  current = null;
  showError("");
  setStatus("");
  $("search").hidden = true;
  $("browse").hidden = false;
}

async function loadSample() {
  try {
    const items = await api(`/api/sample?n=${SAMPLE_SIZE}`);
    $("sample").replaceChildren(...items.map(sampleTile));
  } catch (error) {
    showError(`sample of the collection: ${error.message}`);
  }
}

async function loadStats() {
  try {
    const stats = await api("/api/stats");
    $("stats").textContent = `${stats.count.toLocaleString("en")} images · model ${stats.model}`;
    $("metric").replaceChildren(...stats.modes.map((mode) => {
      const option = element("option", "", mode);
      option.value = mode;
      return option;
    }));
    if (!settings.metricFromUrl) settings.metric = stats.default_mode;
    $("metric").value = settings.metric;
  } catch (error) {
    $("stats").textContent = "";
    showError(`collection: ${error.message}`);
  }
}

// -- input ------------------------------------------------------------------

// A plain click on a tile searches in place; ctrl/middle-click still opens a tab.
document.addEventListener("click", (event) => {
  if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
  const link = event.target.closest("a[data-id], a[data-home]");
  if (!link) return;
  event.preventDefault();
  if ("home" in link.dataset) {
    history.pushState(null, "", pageUrl());
    showSample();
    loadSample();
    return;
  }
  search({ id: link.dataset.id }, "push");
});

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  event.target.value = ""; // choosing the same file again searches again
  if (file) searchFile(file);
});

// Files dropped anywhere on the page. preventDefault on dragover is what
// allows a drop; on drop, it stops the browser from opening the file.
document.addEventListener("dragover", (event) => {
  if (!event.dataTransfer.types.includes("Files")) return;
  event.preventDefault();
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) document.body.classList.remove("dragging"); // left the window
});
document.addEventListener("drop", (event) => {
  document.body.classList.remove("dragging");
  const file = event.dataTransfer.files[0];
  if (!file) return;
  event.preventDefault();
  searchFile(file);
});

// Ctrl-V of an image (or a copied file); pasted text is left to the fields.
document.addEventListener("paste", (event) => {
  const files = event.clipboardData ? [...event.clipboardData.files] : [];
  const file = files.find((f) => f.type.startsWith("image/")) || files[0];
  if (!file) return;
  event.preventDefault();
  searchFile(file);
});

$("metric").addEventListener("change", () => {
  settings.metric = $("metric").value;
  rerun();
});

function applyCount() {
  const n = clampCount($("n").value);
  $("n").value = n;
  if (n === settings.n) return;
  settings.n = n;
  rerun();
}
$("n").addEventListener("change", applyCount);
$("controls").addEventListener("submit", (event) => {
  event.preventDefault(); // Enter in the count field: apply it, don't navigate
  applyCount();
});

$("reshuffle").addEventListener("click", loadSample);
window.addEventListener("popstate", route);

(async () => {
  loadSample();
  readUrl();
  await loadStats(); // the modes, and the default one, before the first search
  route();
})();
