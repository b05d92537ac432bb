// The playground: plain JS against the public API (no build step, no dependencies).
"use strict";
const $ = (id) => document.getElementById(id);
let imageB64 = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("key").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.style.display = msg ? "block" : "none";
}

async function apiError(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${body.error.message} (${resp.status} ${body.error.code})`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

function setImage(file) {
  if (!file || !file.type.startsWith("image/")) { showError("that is not an image file"); return; }
  const reader = new FileReader();
  reader.onload = () => {
    imageB64 = reader.result;  // a data: URI, which the API accepts as is
    $("preview").src = imageB64;
    $("preview").style.display = "block";
  };
  reader.readAsDataURL(file);
}

const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
$("file").addEventListener("change", (e) => setImage(e.target.files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  for (const item of e.clipboardData.items) {
    if (item.type.startsWith("image/")) { setImage(item.getAsFile()); return; }
  }
});

async function loadRerankers() {
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    const sel = $("reranker");
    for (const name of body.rerankers || []) {
      const o = document.createElement("option");
      o.value = name; o.textContent = name + (name === body.default_reranker ? " (default)" : "");
      sel.appendChild(o);
    }
    if (!r.ok) $("meta").textContent = "The server is still loading: " + (body.error || "try again shortly.");
  } catch (e) { showError("cannot reach the server: " + e); }
}

function bar(label, value, scale) {
  const row = document.createElement("div"); row.className = "bar";
  const name = document.createElement("span"); name.textContent = label;
  const track = document.createElement("div"); track.className = "track";
  const mid = document.createElement("div"); mid.className = "mid"; track.appendChild(mid);
  const fill = document.createElement("div");
  const w = scale > 0 ? Math.min(50, 50 * Math.abs(value) / scale) : 0;
  fill.className = "fill " + (value >= 0 ? "pos" : "neg");
  fill.style.width = w + "%";
  fill.style.left = value >= 0 ? "50%" : (50 - w) + "%";
  track.appendChild(fill);
  const num = document.createElement("span"); num.textContent = value.toFixed(3);
  row.append(name, track, num);
  return row;
}

// explain is {name: number} or {group: {name: number}}; fusion's "values" are raw inputs,
// shown as text, not bars
function explainBars(explain) {
  const box = document.createElement("div"); box.className = "bars";
  const groups = [];
  const flat = {};
  for (const [k, v] of Object.entries(explain)) {
    if (typeof v === "number") flat[k] = v;
    else if (v && typeof v === "object" && k !== "values") groups.push([k, v]);
  }
  if (Object.keys(flat).length) groups.unshift(["", flat]);
  for (const [title, vals] of groups) {
    const entries = Object.entries(vals).filter(([, v]) => typeof v === "number");
    entries.sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
    const scale = Math.max(...entries.map(([, v]) => Math.abs(v)), 1e-9);
    if (title) { const g = document.createElement("div"); g.className = "group"; g.textContent = title; box.appendChild(g); }
    for (const [k, v] of entries.slice(0, 12)) box.appendChild(bar(k, v, scale));
  }
  return box;
}

async function entityDetails(c, li) {
  const [meta, img] = await Promise.all([
    fetch(`/v1/entities/${encodeURIComponent(c.entity_id)}`, { headers: headers() }),
    fetch(`/v1/entities/${encodeURIComponent(c.entity_id)}/image`, { headers: headers() }),
  ]);
  if (meta.ok) {
    const e = await meta.json();
    li.querySelector(".attrs").textContent = e.attributes || "(no attributes)";
  }
  const thumb = li.querySelector(".thumb");
  if (img.ok) thumb.src = URL.createObjectURL(await img.blob());
  else {
    const none = document.createElement("div");
    none.className = "thumb"; none.textContent = "no image";
    thumb.replaceWith(none);
  }
  li.dataset.image = img.ok ? "loaded" : "none";
}

function render(body) {
  const ol = $("results"); ol.innerHTML = "";
  const meta = $("meta");
  meta.textContent = `${body.candidates.length} candidates by ${body.reranker} in ` +
    `${body.timings.total_ms.toFixed(1)} ms · index ${body.index_version}`;
  if (body.nil) {
    const n = document.createElement("span"); n.className = "nil";
    n.textContent = "NIL: probably not in the KB"; meta.appendChild(n);
  }
  for (const c of body.candidates) {
    const li = document.createElement("li"); li.className = "cand";
    li.dataset.entityId = c.entity_id;
    const img = document.createElement("img"); img.className = "thumb"; img.alt = c.name;
    const info = document.createElement("div");
    const title = document.createElement("div");
    const name = document.createElement("span"); name.className = "name"; name.textContent = `${c.rank}. ${c.name}`;
    const id = document.createElement("span"); id.className = "id"; id.textContent = c.entity_id;
    title.append(name, id);
    const attrs = document.createElement("div"); attrs.className = "attrs";
    const scores = document.createElement("div"); scores.className = "scores";
    const conf = c.confidence == null ? "" : ` · confidence <b>${(100 * c.confidence).toFixed(1)}%</b>`;
    scores.innerHTML = `score <b>${c.score.toFixed(3)}</b> · retrieval <b>${c.retrieval_score.toFixed(3)}</b>${conf}`;
    info.append(title, attrs, scores);
    if (c.explain) info.appendChild(explainBars(c.explain));
    li.append(img, info);
    ol.appendChild(li);
    entityDetails(c, li);
  }
}

$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("");
  const req = {
    mention: $("mention").value,
    sentence: $("sentence").value,
    top_k: parseInt($("topk").value, 10) || 5,
    explain: $("explain").checked,
  };
  if ($("reranker").value) req.reranker = $("reranker").value;
  if (imageB64) req.image = imageB64;
  $("go").disabled = true;
  try {
    const r = await fetch("/v1/link", {
      method: "POST",
      headers: headers({ "content-type": "application/json" }),
      body: JSON.stringify(req),
    });
    if (!r.ok) { showError(await apiError(r)); return; }
    render(await r.json());
  } catch (err) {
    showError("request failed: " + err);
  } finally {
    $("go").disabled = false;
  }
});

loadRerankers();
