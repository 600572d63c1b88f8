// The search page: plain DOM calls against the JSON API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: null, query: "", key: null, page: 0, perPage: 12 };

function esc(text) {
  const d = document.createElement("div");
  d.textContent = text;
  return d.innerHTML;
}

function filters() {
  const p = new URLSearchParams();
  for (const id of ["split", "modality"]) if ($(id).value) p.set(id, $(id).value);
  const concept = $("concept").value.trim();
  if (concept) {
    const match = [...$("concept-list").options].find((o) => o.value === concept || o.label === concept);
    p.set("concept", match ? match.dataset.id : concept);
  }
  if ($("exact").checked) p.set("exact", "true");
  return p;
}

function status(html, cls = "") {
  $("status").innerHTML = cls ? `<span class="${cls}">${html}</span>` : html;
}

async function getJSON(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function render(answer, what) {
  const notes = answer.notes.map((n) => `<div class="note">note: ${esc(n)}</div>`).join("");
  status(`${esc(what)} — ${answer.hits.length} shown, page ${answer.page + 1}; ${esc(answer.via)} over ` +
         `${answer.pool} ${answer.target} in ${answer.ms} ms${notes}`);
  const explainQ = $("explain").checked && state.mode === "text" ? state.query : null;
  $("results").innerHTML = answer.hits.map((h) => {
    const src = explainQ ? `/api/explain/${encodeURIComponent(h.key)}?q=${encodeURIComponent(explainQ)}` : h.image;
    return `<div class="hit" data-key="${esc(h.key)}" title="click: images like this one and its captions">
      <img src="${src}" alt="${esc(h.id)}" loading="lazy">
      <div class="meta"><b>${h.rank}.</b> ${esc(h.id)} <span class="score">${h.score.toFixed(3)}</span>
        <span class="split">[${esc(h.split)}]</span><div class="caption">${esc(h.caption)}</div></div></div>`;
  }).join("");
  for (const el of document.querySelectorAll(".hit")) el.addEventListener("click", () => similar(el.dataset.key));
  $("prev").disabled = answer.page === 0;
  $("next").disabled = answer.hits.length < state.perPage;
  $("page-label").textContent = `page ${answer.page + 1}`;
}

async function run() {
  const p = filters();
  p.set("k", state.perPage);
  p.set("page", state.page);
  try {
    if (state.mode === "text") {
      p.set("q", state.query);
      render(await getJSON(`/api/search/text?${p}`), `images for "${state.query}"`);
    } else if (state.mode === "similar") {
      render(await getJSON(`/api/similar/${encodeURIComponent(state.key)}?${p}`), `images like ${state.key}`);
    }
  } catch (err) {
    status(esc(err.message), "error");
    $("results").innerHTML = "";
  }
}

async function showCaptions(key) {
  try {
    const a = await getJSON(`/api/captions/${encodeURIComponent(key)}?k=5`);
    $("captions").innerHTML = `<img src="/api/image/${encodeURIComponent(key)}" alt="${esc(key)}">` +
      `<h2>Captions for ${esc(key)}</h2><ol>${a.hits.map((h) =>
        `<li>${esc(h.caption)} <small>(${esc(h.id)}, ${h.score.toFixed(3)})</small></li>`).join("")}</ol>`;
  } catch (err) {
    $("captions").innerHTML = `<span class="error">${esc(err.message)}</span>`;
  }
}

function similar(key) {
  Object.assign(state, { mode: "similar", key, page: 0 });
  showCaptions(key);
  run();
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  status(`encoding ${esc(file.name)}…`);
  try {
    const a = await getJSON(`/api/search/image?k=${state.perPage}`, { method: "POST", body: form });
    Object.assign(state, { mode: "upload", page: 0 });
    $("captions").innerHTML = `<h2>Captions for ${esc(file.name)}</h2><ol>${a.captions.map((h) =>
      `<li>${esc(h.caption)} <small>(${esc(h.id)}, ${h.score.toFixed(3)})</small></li>`).join("")}</ol>`;
    render(a, `images like ${file.name}`);
  } catch (err) {
    status(esc(err.message), "error");
  }
}

async function init() {
  const info = await getJSON("/api/info");
  $("about").textContent = `run ${info.run} · backbone ${info.backbone} · dataset ${info.dataset} · pool ` +
    `${info.pool_images} images, ${info.pool_captions} captions · ${info.index ? info.index + " index" : "exact scan"}` +
    ` · ${info.ranking}`;
  for (const s of info.splits) $("split").add(new Option(s, s));
  for (const m of info.modalities) $("modality").add(new Option(`${m.label} (${m.images})`, m.id));
  for (const c of info.concepts) {
    const o = new Option(`${c.name} (${c.images})`, c.name);
    o.dataset.id = c.id;
    $("concept-list").appendChild(o);
  }
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("query").value.trim();
    if (!q) return status("type a description to search for", "error");
    $("captions").innerHTML = "";
    Object.assign(state, { mode: "text", query: q, page: 0 });
    run();
  });
  $("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); run(); });
  $("next").addEventListener("click", () => { state.page += 1; run(); });
  for (const id of ["split", "modality", "concept", "exact", "explain"]) $(id).addEventListener("change", () => {
    state.page = 0;
    if (state.mode === "text" || state.mode === "similar") run();
  });
  $("file").addEventListener("change", () => $("file").files[0] && upload($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
  });
  status("type a description, or drop an image");
}

init().catch((err) => status(esc(err.message), "error"));
