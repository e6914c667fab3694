"""The review app's pages: Jinja templates (autoescaped) and the few lines of script that post decisions."""

from __future__ import annotations

__all__ = ["render", "OVERVIEW", "CLUSTER", "DECISIONS"]


def render(template: str, **context) -> str:
    from flask import render_template_string

    return render_template_string(BASE.replace("{{ body }}", template), **context)


BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labelkit review — head {{ session.head }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
 table { border-collapse: collapse; } td, th { padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: left; }
 img.t { width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid #ccc; }
 .tiles { display: flex; flex-wrap: wrap; gap: 8px; } .tile { text-align: center; font-size: 12px; }
 .tile img { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #ccc; }
 .accepted { color: #1a7f37; } .rejected { color: #cf222e; } nav a { margin-right: 1em; }
 #message { min-height: 1.5em; color: #0550ae; } .undone { text-decoration: line-through; color: #888; }
</style></head><body>
<nav><a href="/?token={{ token }}">overview</a><a href="/decisions?token={{ token }}">decisions</a>
<button id="save" onclick="save()">save reviewed artefact</button></nav>
<p>{{ session.artefact_path }} · head {{ session.head }} · K = {{ session.state.k }} ·
 {{ "{:,}".format(session.state.labels.size) }} samples · {{ session.state.applied|length }} decisions in force</p>
<div id="message"></div>
{{ body }}
<script>
const TOKEN = {{ token|tojson }};
async function post(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-Review-Token": TOKEN},
                              body: JSON.stringify(body)});
  const out = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) { document.getElementById("message").textContent = "refused: " + out.error; throw new Error(out.error); }
  return out;
}
async function decide(body) { await post("/api/decide", body); location.reload(); }
async function decideEach(bodies) { for (const body of bodies) await post("/api/decide", body); location.reload(); }
async function save() {
  const out = await post("/api/save", {});
  document.getElementById("message").textContent = "saved " + out.path + " (" + out.samples + " samples, id " + out.artefact_id.slice(0, 16) + "…)";
}
function checked(name) { return [...document.querySelectorAll("input[name=" + name + "]:checked")].map(e => e.value); }
</script></body></html>"""

OVERVIEW = """
<h2>Clusters</h2>
<p>sort by {% for key in ["cluster", "size", "confidence", "name", "status"] %}
 <a href="/?token={{ token }}&sort={{ key }}&desc={{ '0' if (sort == key and desc) else '1' if key in ['size', 'confidence'] else '0' }}">{{ key }}</a>
{% endfor %} · page {{ page }} of {{ pages }}{% if empty %} · {{ empty }} empty (merged-away) clusters not shown{% endif %}
{% if page > 1 %}<a id="prev" href="/?token={{ token }}&sort={{ sort }}&desc={{ desc|int }}&page={{ page - 1 }}">previous</a>{% endif %}
{% if page < pages %}<a id="next" href="/?token={{ token }}&sort={{ sort }}&desc={{ desc|int }}&page={{ page + 1 }}">next</a>{% endif %}
· <button id="merge" onclick="decide({op: 'merge', clusters: checked('pick').map(Number)})">merge selected into the first</button></p>
<table id="clusters"><tr><th></th><th>cluster</th><th>most typical members</th><th>size</th><th>confidence</th><th>name</th><th>status</th></tr>
{% for row in rows %}
<tr id="c{{ row.cluster }}"><td><input type="checkbox" name="pick" value="{{ row.cluster }}"></td>
 <td><a href="/cluster/{{ row.cluster }}?token={{ token }}">{{ row.cluster }}</a></td>
 <td>{% for sid in row.examples %}{% if session.source.has_pixels %}<img class="t" loading="lazy" alt="{{ sid }}" src="/thumb?id={{ sid|urlencode }}&token={{ token }}">{% else %}{{ sid }} {% endif %}{% endfor %}</td>
 <td>{{ "{:,}".format(row.size) }}</td><td>{{ "%.3f"|format(row.confidence) }}</td>
 <td><input class="name" size="14" value="{{ row.name or '' }}" onchange="decide({op: 'name', cluster: {{ row.cluster }}, name: this.value})"></td>
 <td class="{{ row.status }}">{{ row.status }}
  <button onclick="decide({op: 'status', cluster: {{ row.cluster }}, status: 'accepted'})">accept</button>
  <button onclick="decide({op: 'status', cluster: {{ row.cluster }}, status: 'rejected'})">reject</button></td></tr>
{% endfor %}</table>
"""

CLUSTER = """
<h2>Cluster {{ row.cluster }}{% if row.name %}: {{ row.name }}{% endif %} <small class="{{ row.status }}">({{ row.status }})</small></h2>
<p>{{ "{:,}".format(row.size) }} samples, mean confidence {{ "%.3f"|format(row.confidence) }} ·
 name <input id="name" size="14" value="{{ row.name or '' }}" onchange="decide({op: 'name', cluster: {{ row.cluster }}, name: this.value})">
 <button onclick="decide({op: 'status', cluster: {{ row.cluster }}, status: 'accepted'})">accept</button>
 <button onclick="decide({op: 'status', cluster: {{ row.cluster }}, status: 'rejected'})">reject</button> ·
 split into <input id="parts" type="number" min="2" value="2" style="width: 4em">
 <button id="split" onclick="decide({op: 'split', cluster: {{ row.cluster }}, k: Number(document.getElementById('parts').value)})">split</button></p>
<p>nearest clusters: {% for c, s in nearest %}<a href="/cluster/{{ c }}?token={{ token }}">{{ c }}{% if session.state.names[c] %} ({{ session.state.names[c] }}){% endif %}</a> {{ "%.3f"|format(s) }} · {% else %}none known{% endfor %}</p>
<p>selected: <button id="remove" onclick="decide({op: 'remove', samples: checked('sample')})">remove (noise)</button>
 <button id="move" onclick="decide({op: 'move', samples: checked('sample'), to: Number(document.getElementById('to').value)})">move to cluster</button>
 <input id="to" type="number" min="0" style="width: 5em">
 <button id="example" onclick="decideEach(checked('sample').map(s => ({op: 'example', sample: s, name: document.getElementById('example-name').value})))">mark as example of</button>
 <input id="example-name" size="12"></p>
<p>members, most typical first · page {{ page }} of {{ pages }}
{% if page > 1 %}<a id="prev" href="/cluster/{{ row.cluster }}?token={{ token }}&page={{ page - 1 }}">previous</a>{% endif %}
{% if page < pages %}<a id="next" href="/cluster/{{ row.cluster }}?token={{ token }}&page={{ page + 1 }}">next</a>{% endif %}</p>
<div class="tiles" id="members">{% for sid, score in samples %}
<label class="tile">{% if session.source.has_pixels %}<img loading="lazy" alt="{{ sid }}" src="/thumb?id={{ sid|urlencode }}&token={{ token }}">{% endif %}<br>
<input type="checkbox" name="sample" value="{{ sid }}"> {{ "%.2f"|format(score) }}<br>{{ sid }}</label>
{% endfor %}</div>
"""

DECISIONS = """
<h2>Decisions</h2>
<table id="log"><tr><th>#</th><th>decision</th><th></th></tr>
{% for e in entries %}
<tr class="{{ 'undone' if e.seq in undone else '' }}"><td>{{ e.seq }}</td>
 <td>{{ e.op }} {% for key, value in e.items() if key not in ['seq', 'time', 'op', 'parts'] %}{{ key }}={{ value }} {% endfor %}
 {% if e.parts %}parts of {{ e.parts|map('length')|join(', ') }}{% endif %}</td>
 <td>{% if e.op != 'undo' and e.seq not in undone %}<button onclick="decide({op: 'undo', undo: {{ e.seq }}})">undo</button>{% endif %}</td></tr>
{% endfor %}</table>
"""
