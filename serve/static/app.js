// The search page: plain DOM calls against the JSON API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
// mode "upload" keeps the dropped File: paging and filters re-post it, the server keeps no upload;
// perPage is the server's default k, from /api/info
const state = { mode: null, query: "", key: null, file: null, page: 0, perPage: null, maxUpload: Infinity };

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
      <div class="meta"><b>${h.rank}.</b> ${esc(h.id)} ${scoreLabel(answer, h)}
        <span class="split">[${esc(h.split)}]</span><div class="caption">${esc(h.caption)}</div></div></div>`;
  }).join("");
  for (const el of document.querySelectorAll(".hit")) el.addEventListener("click", () => similar(el.dataset.key));
  $("prev").disabled = answer.page === 0;
  $("next").disabled = answer.hits.length < state.perPage;
  $("page-label").textContent = `page ${answer.page + 1}`;
}

// Every score says how it was ranked: with the run's query bank the ranked score is cos − β·hub, and
// the plain cosine is shown beside it so the two are never confused.
function scoreLabel(answer, h) {
  if (answer.ranked_by && answer.ranked_by !== "cosine") {
    return `<span class="score" title="ranked by ${esc(answer.ranked_by)}">score ${h.score.toFixed(3)}</span>` +
      ` <span class="score" title="plain cosine">cos ${h.cosine.toFixed(3)}</span>`;
  }
  return `<span class="score" title="ranked by plain cosine">cos ${h.score.toFixed(3)}</span>`;
}

// An image-only pool has no captions to show: its answer's notes say so under the images.
function showUploadCaptions(answer, name) {
  if (!answer.captions.length) {
    $("captions").innerHTML = "";
    return;
  }
  const how = {ranked_by: answer.captions_ranked_by};
  $("captions").innerHTML = `<h2>Captions for ${esc(name)}</h2><ol>${answer.captions.map((h) =>
    `<li>${esc(h.caption)} <small>(${esc(h.id)}, ${scoreLabel(how, h)})</small></li>`).join("")}</ol>`;
}

// The image's own bytes are the request body (not a form): the server counts them as they arrive.
// A NIfTI or DICOM suffix is sent, nothing else of the file's name: it tells a NIfTI volume or a
// DICOM file without the Part 10 preamble apart, which have no signature.
async function searchUpload(p) {
  const file = state.file;
  const suffix = /\.(nii\.gz|nii|dcm|dicom|dic)$/i.exec(file.name);
  if (suffix) p.set("name", `upload${suffix[0].toLowerCase()}`);
  const a = await getJSON(`/api/search/image?${p}`, {
    method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
  });
  showUploadCaptions(a, file.name);
  render(a, `images like ${file.name}`);
}

// Runs the current query (text, similar or upload) with the filters and page; true when it answered.
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
    } else if (state.mode === "upload") {
      await searchUpload(p);
    }
    return true;
  } catch (err) {
    status(esc(err.message), "error");
    $("results").innerHTML = "";
    return false;
  }
}

async function showCaptions(key) {
  try {
    const a = await getJSON(`/api/captions/${encodeURIComponent(key)}?k=5`);
    const list = a.hits.length ? `<ol>${a.hits.map((h) =>
      `<li>${esc(h.caption)} <small>(${esc(h.id)}, ${scoreLabel(a, h)})</small></li>`).join("")}</ol>` :
      a.notes.map((n) => `<div class="note">${esc(n)}</div>`).join("");
    $("captions").innerHTML = `<img src="/api/image/${encodeURIComponent(key)}" alt="${esc(key)}">` +
      `<h2>Captions for ${esc(key)}</h2>${list}`;
  } catch (err) {
    $("captions").innerHTML = `<span class="error">${esc(err.message)}</span>`;
  }
}

function similar(key) {
  Object.assign(state, { mode: "similar", key, page: 0 });
  showCaptions(key);
  run();
}

// A refused upload (not an image, too large) leaves the previous query in charge of paging and filters.
async function upload(file) {
  if (file.size > state.maxUpload) {  // the server would refuse it too, but only after the browser starts sending
    return status(`${esc(file.name)}: ${file.size} bytes is more than the ${state.maxUpload} bytes an upload may be`,
                  "error");
  }
  const previous = { ...state };
  Object.assign(state, { mode: "upload", file, page: 0 });
  status(`encoding ${esc(file.name)}…`);
  if (!(await run())) Object.assign(state, previous);
}

async function init() {
  const info = await getJSON("/api/info");
  $("about").textContent = `run ${info.run} · backbone ${info.backbone} · dataset ${info.dataset} · pool ` +
    `${info.pool_images} images, ${info.pool_captions} captions · ${info.index ? info.index + " index" : "exact scan"}` +
    ` · ${info.ranking}`;
  state.maxUpload = info.max_upload_bytes;
  state.perPage = info.k;
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
    if (state.mode) run();
  });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    $("file").value = "";  // choosing the same file again is a new upload
    if (file) upload(file);
  });
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
