// The search page: talks to the JSON API of the same server; the query lives in the URL.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_K = 1000;  // results per page
const TOKEN_COOKIE = "semsearch_token";
let view = null;  // what the grid shows: {title ("for “dog”"), fetch(page_token) -> API answer, token, shown}
let again = null;  // runs the photo search shown now once more (when the filters change)

class ApiError extends Error {
  constructor(message, code, status) { super(message); this.code = code; this.status = status; }
}

async function api(url, options = {}) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: a proxy's page, say */ }
  if (!response.ok) {
    throw new ApiError(body?.error || `${response.status} ${response.statusText}`, body?.code || "HTTP", response.status);
  }
  return body;
}

function pageSize() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), MAX_K) : 24;
}

function imageUrl(id, thumbnail) {
  return "/api/images/" + id.split("/").map(encodeURIComponent).join("/") + (thumbnail ? "/thumbnail" : "");
}

function showError(error) {
  if (error.status === 401) {
    $("token-form").hidden = false;
  }
  const message = $("message");
  message.textContent = error instanceof ApiError ? `${error.message} (${error.code})` : `Something went wrong: ${error.message}`;
  message.hidden = false;
}

function clearMessages() {
  $("message").hidden = true;
  $("token-form").hidden = true;
}

// The filters, as the API's query parameters: label (repeated), folder, after, before.
function filterParams() {
  const params = new URLSearchParams();
  for (const label of $("f-label").value.split(",").map((l) => l.trim()).filter(Boolean)) params.append("label", label);
  for (const [name, id] of [["folder", "f-folder"], ["after", "f-after"], ["before", "f-before"]]) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  return params;
}

function describeFilters() {
  const parts = [];
  const labels = filterParams().getAll("label");
  if (labels.length) parts.push(`label ${labels.join(" or ")}`);
  if ($("f-folder").value.trim()) parts.push(`in ${$("f-folder").value.trim()}`);
  if ($("f-after").value) parts.push(`taken on or after ${$("f-after").value}`);
  if ($("f-before").value) parts.push(`taken before ${$("f-before").value}`);
  return parts.length ? ` (${parts.join(", ")})` : "";
}

// k, min_score, the filters and the page token as API query parameters.
function apiParams(token) {
  const params = new URLSearchParams({k: pageSize()});
  if ($("min-score").value.trim() !== "") params.set("min_score", $("min-score").value.trim());
  for (const [name, value] of filterParams()) params.append(name, value);
  if ($("explain").checked) params.set("explain", "true");
  if (token) params.set("page_token", token);
  return params.toString();
}

function setUrl(params) {
  const search = new URLSearchParams(params);
  if (pageSize() !== 24) search.set("k", pageSize());
  if ($("min-score").value.trim() !== "") search.set("min_score", $("min-score").value.trim());
  if ($("explain").checked) search.set("explain", "1");
  if (params.q !== undefined || params.similar !== undefined || params.like !== undefined) {
    for (const [name, value] of filterParams()) search.append(name, value);
  }
  const url = search.toString() ? `/?${search}` : "/";
  if (url !== location.pathname + location.search) history.pushState(null, "", url);
}

function card(hit) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.tabIndex = 0;
  figure.title = `${hit.id}: photos like this one`;
  figure.dataset.id = hit.id;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = hit.label || hit.id;
  img.src = imageUrl(hit.id, true);
  const caption = document.createElement("figcaption");
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = hit.label || "-";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  caption.append(label, score);
  figure.append(img, caption);
  if (hit.explanation) figure.append(why(hit.explanation));
  const open = () => similarToId(hit.id, hit.label);
  figure.addEventListener("click", open);
  figure.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
  return figure;
}

// Why a photo matched: each query term's share of its score, the photo's words and ImageNet classes.
function why(explanation) {
  const box = document.createElement("div");
  box.className = "why";
  const line = (text) => { const p = document.createElement("p"); p.textContent = text; box.append(p); };
  line(explanation.shares.map((s) => `${s.term} ${s.share >= 0 ? "+" : "−"}${Math.abs(s.share).toFixed(3)}`).join("  "));
  line("words: " + explanation.words.map((w) => w.word).join(", "));
  if (explanation.classes.length) line("classes: " + explanation.classes.map((c) => c.name).join(", "));
  return box;
}

function chip(word, score, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "chip";
  const text = document.createElement("span");
  text.className = "word";
  text.textContent = word;
  const small = document.createElement("small");
  small.textContent = score.toFixed(2);
  button.append(text, small);
  button.addEventListener("click", onClick);
  return button;
}

// Shows `view` from scratch, then the next page on each "More", by the page token of the one before.
async function show(newView) {
  view = {...newView, token: "", shown: 0, title: newView.title + describeFilters()};
  $("grid").replaceChildren();
  $("more").hidden = true;
  $("status").textContent = "Searching…";
  await more();
}

async function more() {
  const current = view;
  let answer;
  try {
    answer = await current.fetch(current.token);
  } catch (error) {
    if (current === view) { $("status").textContent = ""; showError(error); }
    return;
  }
  if (current !== view) return;  // a newer query replaced this one
  $("grid").append(...answer.results.map(card));
  current.shown += answer.results.length;
  current.token = answer.next_page_token || "";
  $("more").hidden = !current.token;
  $("status").textContent = current.shown === 0 ? `No photos ${current.title}.`
    : `${current.shown} photos ${current.title}${current.token ? "; More shows the next " + pageSize() : ""}.`;
}

function search(q, push = true) {
  clearMessages();
  $("query").hidden = true;
  $("q").value = q;
  if (push) setUrl({q});
  again = () => search(q);
  return show({title: `for “${q}”`, fetch: (token) => api(`/api/search?q=${encodeURIComponent(q)}&${apiParams(token)}`)});
}

// Words and an indexed photo in one query: the photo's "+ words" form.
function searchLike(q, id, push = true) {
  clearMessages();
  if (push) setUrl(q ? {q, like: id} : {like: id});
  again = () => searchLike(q, id);
  showQueryPhoto(id, `Photos like ${id}${q ? " + " + q : ""}`);
  $("like-words").value = q;
  const words = q ? `q=${encodeURIComponent(q)}&` : "";
  return show({title: `like ${id}${q ? " + “" + q + "”" : ""}`, fetch: (token) =>
    api(`/api/search?${words}like=${encodeURIComponent(id)}&${apiParams(token)}`)});
}

function showQueryPhoto(id, title) {
  $("query").hidden = false;
  $("query-photo").src = imageUrl(id, true);
  $("query-title").textContent = title;
  $("tags").replaceChildren();
  $("like-form").hidden = false;
  $("like-form").dataset.id = id;
  window.scrollTo(0, 0);
}

function similarToId(id, label, push = true) {
  clearMessages();
  if (push) setUrl({similar: id});
  again = () => similarToId(id, label);
  showQueryPhoto(id, `Photos like ${id}${label ? " (" + label + ")" : ""}`);
  $("like-words").value = "";
  return show({title: `like ${id}`, fetch: (token) => api(`/api/similar?${apiParams(token)}`, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({id})})});
}

async function upload(file) {
  clearMessages();
  setUrl({});
  $("query").hidden = false;
  $("query-photo").src = URL.createObjectURL(file);
  $("query-title").textContent = `Tags for ${file.name}`;
  $("tags").replaceChildren();
  $("like-form").hidden = true;  // an uploaded photo has no id to add words to
  const form = () => { const data = new FormData(); data.append("image", file); return data; };
  const tagging = api("/api/tag?k=8", {method: "POST", body: form()}).then((answer) => {
    $("tags").replaceChildren(...answer.tags.map((t) => chip(t.word, t.score, () => search(t.word))));
  }, showError);
  again = () => upload(file);
  await Promise.all([tagging, show({title: `like ${file.name}`, fetch: (token) =>
    api(`/api/similar?${apiParams(token)}`, {method: "POST", body: form()})})]);
}

async function similarWords(word, push = true) {
  clearMessages();
  $("word").value = word;
  if (push) setUrl({word});
  try {
    const answer = await api(`/api/words?word=${encodeURIComponent(word)}&k=12`);
    $("words-title").textContent = `Words like “${word}”`;
    $("word-list").replaceChildren(...answer.words.map((w) => chip(w.word, w.score, () => search(w.word))));
    $("words").hidden = false;
  } catch (error) {
    showError(error);
  }
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  if (params.has("k")) $("k").value = params.get("k");
  if (params.has("min_score")) $("min-score").value = params.get("min_score");
  $("explain").checked = params.get("explain") === "1";
  $("f-label").value = params.getAll("label").join(", ");
  $("f-folder").value = params.get("folder") || "";
  $("f-after").value = params.get("after") || "";
  $("f-before").value = params.get("before") || "";
  if (params.get("like")) searchLike(params.get("q") || "", params.get("like"), false);
  else if (params.get("q")) search(params.get("q"), false);
  else if (params.get("similar")) similarToId(params.get("similar"), null, false);
  if (params.get("word")) similarWords(params.get("word"), false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("q").value.trim();
    if (q) search(q); else showError(new ApiError("Type one or more words, e.g. cat sofa", "INVALID_ARGUMENT", 400));
  });
  $("words-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const word = $("word").value.trim();
    if (word) similarWords(word);
  });
  $("like-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchLike($("like-words").value.trim(), $("like-form").dataset.id);
  });
  $("more").addEventListener("click", more);
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    if (again) again();
  });
  $("clear-filters").addEventListener("click", () => {
    for (const id of ["f-label", "f-folder", "f-after", "f-before"]) $(id).value = "";
    if (again) again();
  });
  $("upload").addEventListener("change", () => { if ($("upload").files[0]) upload($("upload").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) upload(file);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `${TOKEN_COOKIE}=${encodeURIComponent($("token").value.trim())}; path=/; SameSite=Strict${secure}`;
    location.reload();
  });
  window.addEventListener("popstate", fromUrl);
  fromUrl();
});
