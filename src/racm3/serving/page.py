"""The web page served at /: one HTML document with inline CSS and script, no external assets (works offline).

Every caption and id shown comes from users, so the script builds the page with textContent and element
properties only, never by writing HTML from data.
"""

PAGE_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>racm3 serve</title>
<style>
:root{--fg:#1d2330;--mute:#667;--line:#dde1e8;--acc:#2457c5;--bg:#f6f7f9}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;gap:1em;align-items:baseline;padding:.7em 1.2em;background:#fff;border-bottom:1px solid var(--line)}
header h1{font-size:18px;margin:0}header .info{color:var(--mute)}
nav{display:flex;gap:.3em;padding:.6em 1.2em 0}
nav button{border:1px solid var(--line);border-bottom:none;background:#eceff3;padding:.45em 1em;border-radius:6px 6px 0 0;cursor:pointer;font:inherit}
nav button.on{background:#fff;font-weight:600}
main{background:#fff;margin:0 1.2em 1.2em;border:1px solid var(--line);padding:1em;border-radius:0 6px 6px 6px;min-height:380px}
section{display:none}section.on{display:block}
.row{display:flex;flex-wrap:wrap;gap:.6em;align-items:center;margin-bottom:.8em}
input[type=text],input[type=password],input[type=number]{font:inherit;padding:.4em .5em;border:1px solid #bbc;border-radius:4px}
input.wide{min-width:22em;flex:1}input[type=number]{width:5em}
button.go{background:var(--acc);color:#fff;border:none;border-radius:4px;padding:.45em 1.1em;font:inherit;cursor:pointer}
button.go:disabled{opacity:.5;cursor:wait}button.small{font-size:12px;padding:.15em .5em;cursor:pointer}
label{color:var(--mute)}
.result{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}
.main-out{display:flex;flex-direction:column;gap:.4em}
.main-out img.big{width:256px;height:256px;image-rendering:pixelated;border:1px solid var(--line);background:#fff}
.samples img{width:48px;height:48px;image-rendering:pixelated;border:1px solid var(--line);margin-right:3px}
.caption-out{font-size:20px;font-weight:600;min-height:1.4em}
.cards{display:flex;flex-wrap:wrap;gap:.7em}
.card{width:150px;border:1px solid var(--line);border-radius:6px;padding:.5em;background:#fff;display:flex;flex-direction:column;gap:.25em}
.card img{width:132px;height:132px;image-rendering:pixelated;background:#fafafa;border:1px solid #eee}
.card .cap{font-weight:600;word-wrap:break-word}.card .id{font-size:11px;color:var(--mute);word-break:break-all}
.card .score{font-size:12px;color:var(--acc)}.card .btns{display:flex;flex-wrap:wrap;gap:3px}
h3{font-size:14px;margin:.2em 0 .5em;color:var(--mute);font-weight:600}
#progress{display:none;align-items:center;gap:.6em;color:var(--acc);margin:.4em 0 .8em}#progress.on{display:flex}
.spin{width:18px;height:18px;border:3px solid #c9d6f3;border-top-color:var(--acc);border-radius:50%;animation:spin .8s linear infinite}
.bar{width:160px;height:6px;background:#e3e9f7;border-radius:3px;overflow:hidden}
.bar i{display:block;width:40%;height:100%;background:var(--acc);animation:slide 1.2s ease-in-out infinite}
@keyframes spin{to{transform:rotate(360deg)}}@keyframes slide{0%{margin-left:-40%}100%{margin-left:100%}}
#error{display:none;background:#fdecec;color:#8a1c1c;border:1px solid #f3c0c0;padding:.5em .8em;border-radius:4px;margin-bottom:.8em}
#error.on{display:block}
#demos{margin:0 1.2em .8em;padding:.5em .8em;border:1px dashed #bbc;border-radius:6px;background:#fff}
#demos .cards .card{width:120px}#demos .card img{width:102px;height:102px}
.preview{width:128px;height:128px;image-rendering:pixelated;border:1px solid var(--line);display:none}
.muted{color:var(--mute)}
</style></head>
<body>
<header><h1>racm3</h1><span class="info" id="info">loading the memory ...</span></header>
<nav id="tabs"><button data-tab="draw" class="on">Caption &rarr; image</button><button data-tab="describe">Image &rarr; caption</button>
<button data-tab="search">Search</button><button data-tab="memory">Memory</button></nav>
<main>
<div id="error" role="alert"></div>
<div id="progress" aria-live="polite"><div class="spin"></div><div class="bar"><i></i></div><span id="progress-text">generating</span></div>

<section id="tab-draw" class="on">
 <div class="row"><input id="caption" class="wide" type="text" placeholder="a caption to draw, e.g. flag: France" value="">
  <label>k <input id="draw-k" type="number" min="0" max="16" value="2"></label>
  <label>samples <input id="draw-samples" type="number" min="1" max="16" value="4"></label>
  <label>seed <input id="draw-seed" type="number" min="0" value="0"></label>
  <button class="go" id="draw">Generate image</button></div>
 <div class="result" id="draw-result" hidden>
  <div class="main-out"><h3>generated</h3><img class="big" id="draw-image" alt="generated image"><div class="samples" id="draw-samples-out"></div>
   <span class="muted" id="draw-time"></span></div>
  <div><h3 id="draw-sources-title">sources</h3><div class="cards" id="draw-sources"></div></div>
 </div>
</section>

<section id="tab-describe">
 <div class="row"><input id="describe-file" type="file" accept="image/*">
  <span class="muted">or pick one: &ldquo;caption this&rdquo; on any document</span>
  <label>k <input id="describe-k" type="number" min="0" max="16" value="2"></label>
  <button class="go" id="describe">Write caption</button></div>
 <div class="result">
  <div class="main-out"><h3>image</h3><img class="preview" id="describe-preview" alt="image to caption">
   <h3>caption</h3><div class="caption-out" id="describe-text"></div><div class="muted" id="describe-samples"></div>
   <span class="muted" id="describe-time"></span></div>
  <div><h3>sources</h3><div class="cards" id="describe-sources"></div></div>
 </div>
</section>

<section id="tab-search">
 <div class="row"><input id="search-text" class="wide" type="text" placeholder="search the memory by text">
  <input id="search-file" type="file" accept="image/*" title="or search by an image">
  <label>k <input id="search-k" type="number" min="1" max="1000" value="8"></label>
  <button class="go" id="search">Search</button></div>
 <div class="cards" id="search-hits"></div>
</section>

<section id="tab-memory">
 <div class="row"><label>token <input id="token" type="password" placeholder="racm3 serve --token"></label>
  <span class="muted" id="writes"></span></div>
 <div class="row"><input id="add-id" type="text" placeholder="new document id"><input id="add-text" class="wide" type="text" placeholder="caption">
  <input id="add-file" type="file" accept="image/*"><button class="go" id="add">Add document</button></div>
 <div class="row"><button class="small" id="prev">&larr; previous</button><span id="page-info" class="muted"></span>
  <button class="small" id="next">next &rarr;</button></div>
 <div class="cards" id="browse"></div>
</section>
</main>
<div id="demos"><h3>demonstrations (<span id="demo-count">0</span>): documents picked with &ldquo;demo&rdquo;</h3>
 <label><input type="checkbox" id="use-demos"> generate with these as in-context examples instead of retrieval</label>
 <div class="cards" id="demo-cards"></div></div>
<script>
"use strict";
const $ = id => document.getElementById(id);
const state = {demos: [], describeBlob: null, offset: 0, limit: 24, count: 0, busy: 0};

function el(tag, props, ...kids){
  const e = document.createElement(tag);
  for(const [k, v] of Object.entries(props || {})){ if(k === "text") e.textContent = v; else if(k === "cls") e.className = v; else e[k] = v; }
  for(const kid of kids) if(kid) e.append(kid);
  return e;
}
function showError(msg){ const e = $("error"); e.textContent = msg || ""; e.classList.toggle("on", !!msg); }
async function api(path, opts){
  const r = await fetch(path, opts || {});
  let body = null; try { body = await r.json(); } catch(_) {}
  if(!r.ok){
    let msg = (body && typeof body.detail === "string") ? body.detail : ("HTTP " + r.status);
    if(r.status === 503 && r.headers.get("Retry-After")) msg += " (retry after " + r.headers.get("Retry-After") + " s)";
    throw new Error(msg);
  }
  return body;
}
let timer = null;
function busy(on, label){
  state.busy += on ? 1 : -1;
  const p = $("progress");
  if(on){
    const t0 = performance.now();
    p.classList.add("on"); clearInterval(timer);
    timer = setInterval(() => { $("progress-text").textContent = label + " ... " + ((performance.now() - t0) / 1000).toFixed(1) + " s"; }, 100);
    $("progress-text").textContent = label + " ...";
  } else if(state.busy === 0){ p.classList.remove("on"); clearInterval(timer); }
  for(const id of ["draw", "describe"]) $(id).disabled = state.busy > 0;
}
function intOf(id){ return parseInt($(id).value, 10) || 0; }
function demoIds(){ return $("use-demos").checked && state.demos.length ? state.demos.map(d => d.id) : null; }

function card(doc, opts){
  opts = opts || {};
  const c = el("div", {cls: "card"});
  if(doc.image_url) c.append(el("img", {src: doc.image_url, alt: doc.text || doc.id, loading: "lazy"}));
  c.append(el("div", {cls: "cap", text: doc.text || "(no caption)"}), el("div", {cls: "id", text: doc.id}));
  if(doc.score !== undefined && doc.score !== null) c.append(el("div", {cls: "score", text: "score " + Number(doc.score).toFixed(3)}));
  const b = el("div", {cls: "btns"});
  if(!opts.inTray) b.append(el("button", {cls: "small", text: "demo", title: "use as an in-context demonstration", onclick: () => addDemo(doc)}));
  else b.append(el("button", {cls: "small", text: "drop", onclick: () => { state.demos = state.demos.filter(d => d.id !== doc.id); renderDemos(); }}));
  if(doc.image_url && !opts.inTray) b.append(el("button", {cls: "small", text: "caption this", onclick: () => pickImage(doc)}));
  if(opts.removable) b.append(el("button", {cls: "small", text: "remove", onclick: () => removeDoc(doc.id)}));
  c.append(b);
  return c;
}
function fill(id, docs, opts){ const box = $(id); box.replaceChildren(...docs.map(d => card(d, opts))); if(!docs.length) box.append(el("span", {cls: "muted", text: "none"})); }
function addDemo(doc){ if(!state.demos.some(d => d.id === doc.id)){ state.demos.push(doc); $("use-demos").checked = true; renderDemos(); } }
function renderDemos(){ $("demo-count").textContent = state.demos.length; fill("demo-cards", state.demos, {inTray: true}); }

async function loadInfo(){
  try{
    const m = await api("/v1/memory");
    state.count = m.count;
    $("info").textContent = m.count + " documents · index " + m.index_name + " · " + m.encoder + " · writes " + (m.writes === "token" ? "with the token" : "off (started without --token)");
    $("writes").textContent = m.writes === "token" ? "adding and removing need the server's token" : "this server was started without --token: its memory is read-only";
  } catch(e){ showError(e.message); }
}
function showTab(name){
  for(const b of document.querySelectorAll("nav button")) b.classList.toggle("on", b.dataset.tab === name);
  for(const s of document.querySelectorAll("main section")) s.classList.toggle("on", s.id === "tab-" + name);
  if(name === "memory") browse();
}
for(const b of document.querySelectorAll("nav button")) b.onclick = () => showTab(b.dataset.tab);

async function draw(){
  showError("");
  const caption = $("caption").value.trim();
  if(!caption){ showError("caption: type the text to draw, e.g. flag: France"); return; }
  const body = {caption, k: intOf("draw-k"), samples: intOf("draw-samples") || 1, seed: intOf("draw-seed")};
  const demos = demoIds(); if(demos) body.demos = demos;
  busy(true, "generating the image");
  try{
    const out = await api("/v1/generate/image", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    $("draw-result").hidden = false;
    $("draw-image").src = out.image;
    $("draw-samples-out").replaceChildren(...out.samples.map(s => el("img", {src: s.image_url, title: "score " + s.score, alt: "sample"})));
    $("draw-time").textContent = out.samples.length + " samples, best first · " + out.seconds + " s";
    $("draw-sources-title").textContent = demos ? "demonstrations used" : "retrieved sources";
    fill("draw-sources", out.sources);
  } catch(e){ showError(e.message); } finally { busy(false); }
}
$("draw").onclick = draw;
$("caption").addEventListener("keydown", e => { if(e.key === "Enter") draw(); });

function setDescribeImage(blob){
  state.describeBlob = blob;
  const p = $("describe-preview"); p.src = URL.createObjectURL(blob); p.style.display = "block";
  $("describe-text").textContent = ""; $("describe-sources").replaceChildren();
}
$("describe-file").onchange = () => { const f = $("describe-file").files[0]; if(f) setDescribeImage(f); };
async function pickImage(doc){
  try{ const r = await fetch(doc.image_url); if(!r.ok) throw new Error("cannot load the image of " + doc.id); setDescribeImage(await r.blob()); showTab("describe"); }
  catch(e){ showError(e.message); }
}
async function describe(){
  showError("");
  if(!state.describeBlob){ showError("image: choose an image file, or press \u201ccaption this\u201d on a document"); return; }
  const form = new FormData();
  form.append("image", state.describeBlob, "image.png");
  form.append("k", String(intOf("describe-k")));
  const demos = demoIds(); if(demos) for(const d of demos) form.append("demos", d);
  busy(true, "writing the caption");
  try{
    const out = await api("/v1/generate/text", {method: "POST", body: form});
    $("describe-text").textContent = out.text;
    $("describe-samples").textContent = "other samples: " + out.samples.slice(1).map(s => s.text).join(" · ");
    $("describe-time").textContent = out.seconds + " s";
    fill("describe-sources", out.sources);
  } catch(e){ showError(e.message); } finally { busy(false); }
}
$("describe").onclick = describe;

function fileBase64(file){
  return new Promise((ok, bad) => { const r = new FileReader(); r.onload = () => ok(String(r.result)); r.onerror = () => bad(new Error("cannot read the file")); r.readAsDataURL(file); });
}
async function search(){
  showError("");
  const text = $("search-text").value.trim(), file = $("search-file").files[0];
  const body = {k: intOf("search-k") || 8};
  if(text) body.text = text; else if(file) body.image = await fileBase64(file);
  else { showError("search: type words or choose an image"); return; }
  try{ const out = await api("/v1/retrieve", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)}); fill("search-hits", out.hits); }
  catch(e){ showError(e.message); }
}
$("search").onclick = search;
$("search-text").addEventListener("keydown", e => { if(e.key === "Enter") search(); });

function auth(){ const t = $("token").value.trim(); return t ? {"Authorization": "Bearer " + t} : {}; }
async function browse(){
  try{
    const out = await api("/v1/documents?offset=" + state.offset + "&limit=" + state.limit);
    state.count = out.count;
    $("page-info").textContent = out.count ? (state.offset + 1) + "-" + Math.min(state.offset + state.limit, out.count) + " of " + out.count : "the memory is empty";
    fill("browse", out.documents, {removable: true});
  } catch(e){ showError(e.message); }
}
$("prev").onclick = () => { state.offset = Math.max(0, state.offset - state.limit); browse(); };
$("next").onclick = () => { if(state.offset + state.limit < state.count){ state.offset += state.limit; browse(); } };
async function removeDoc(id){
  showError("");
  if(!confirm("Remove " + id + " from the memory?")) return;
  try{ await api("/v1/memory/documents/" + encodeURIComponent(id), {method: "DELETE", headers: auth()}); await browse(); loadInfo(); }
  catch(e){ showError(e.message); }
}
$("add").onclick = async () => {
  showError("");
  const form = new FormData();
  form.append("id", $("add-id").value.trim()); form.append("text", $("add-text").value.trim());
  const f = $("add-file").files[0]; if(f) form.append("image", f);
  try{
    await api("/v1/memory/documents", {method: "POST", headers: auth(), body: form});
    $("add-id").value = ""; $("add-text").value = ""; $("add-file").value = "";
    state.offset = Math.max(0, Math.floor(state.count / state.limit) * state.limit); await browse(); loadInfo();
  } catch(e){ showError(e.message); }
};
loadInfo(); renderDemos();
</script></body></html>
"""
