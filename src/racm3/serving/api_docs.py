"""/docs: the OpenAPI description rendered by a few lines of inline script (FastAPI's Swagger UI loads from a CDN,
and this server must work offline); /openapi.json is the machine-readable form."""

from __future__ import annotations

import html

_DOCS = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>__TITLE__ API</title>
<style>body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em;color:#222}
h2{font-size:15px;margin:1.6em 0 .3em}code,pre{font:12.5px ui-monospace,monospace;background:#f4f4f4;padding:1px 4px}
pre{padding:.6em;overflow:auto}.m{display:inline-block;min-width:4.5em;font-weight:600}.d{color:#555}</style></head>
<body><h1>__TITLE__</h1><p>Machine-readable: <a href="/openapi.json">/openapi.json</a>. The web page: <a href="/">/</a>.</p>
<div id="api">loading /openapi.json ...</div><script>
"use strict";
function el(tag, text, cls){const e=document.createElement(tag); if(text!==undefined) e.textContent=text; if(cls) e.className=cls; return e;}
fetch("/openapi.json").then(r=>r.json()).then(spec=>{
  const root=document.getElementById("api"); root.textContent="";
  const ref=s=>s&&s.$ref?spec.components.schemas[s.$ref.split("/").pop()]:s;
  for(const [path, ops] of Object.entries(spec.paths)){
    for(const [method, op] of Object.entries(ops)){
      const h=el("h2"); h.append(el("span", method.toUpperCase(), "m"), el("code", path)); root.append(h);
      if(op.description||op.summary) root.append(el("p", op.description||op.summary, "d"));
      const params=(op.parameters||[]).map(p=>p.name+" ("+p.in+")");
      if(params.length) root.append(el("p", "parameters: "+params.join(", ")));
      const body=op.requestBody&&Object.entries(op.requestBody.content||{})[0];
      if(body){const s=ref(body[1].schema)||{}; const rows=Object.entries(s.properties||{}).map(([k,v])=>
        k+(s.required&&s.required.includes(k)?" (required)":"")+(v.default!==undefined?" = "+JSON.stringify(v.default):"")+
        (v.description?"  # "+v.description:""));
        root.append(el("p", "body: "+body[0])); if(rows.length) root.append(el("pre", rows.join("\\n")));}
    }
  }
}).catch(e=>{document.getElementById("api").textContent="cannot read /openapi.json: "+e;});
</script></body></html>"""


def api_docs_html(title: str) -> str:
    return _DOCS.replace("__TITLE__", html.escape(title))
