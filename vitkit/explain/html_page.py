"""One self-contained HTML page for an explain run: every image with its prediction and each method's overlay, and an
attention browser (layer and head selectors) whose maps are small PNGs laid over the photo by the browser. Images are
embedded as ``data:`` URIs, so the file can be mailed or opened offline; the page needs no network and no library."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vitkit.explain.render import colorize, to_data_uri

__all__ = ["ImageReport", "write_report", "heat_png"]


@dataclass
class ImageReport:
    name: str
    label: str  # e.g. "tabby cat (0.82)"
    photo: str  # data URI of the input as the model saw it
    overlays: dict[str, str] = field(default_factory=dict)  # method → data URI
    attention: dict[str, list[str]] = field(default_factory=dict)  # layer → per-head data URIs (grid-sized PNGs)
    extra: dict[str, str] = field(default_factory=dict)  # e.g. DAT's sampling points → data URI


def heat_png(heat: np.ndarray) -> str:
    """A small RGBA PNG of a (h, w) map in [0, 1]: the colour ramp, transparent where the map is low."""
    rgb = colorize(heat)
    alpha = (np.clip(heat, 0, 1) ** 0.5 * 200).astype(np.uint8)[..., None]
    return to_data_uri(Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA"))


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:22px} h2{font-size:17px;margin:6px 0}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:14px 0}
.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;text-align:center} figcaption{font-size:12px;color:#555}
figure img{width:192px;height:192px;object-fit:contain;border:1px solid #eee}
.stack{position:relative;width:288px;height:288px}
.stack img{position:absolute;left:0;top:0;width:288px;height:288px;image-rendering:pixelated}
.stack img.photo{image-rendering:auto}
select{margin:4px}
"""

_SCRIPT = """
const DATA = JSON.parse(document.getElementById('attention-data').textContent);
function show(i){
  const layer = document.getElementById('layer'+i).value, head = document.getElementById('head'+i).value;
  const maps = DATA[i][layer];
  const h = head === 'mean' ? maps.length - 1 : parseInt(head);
  document.getElementById('attn'+i).src = maps[h];
}
function fillHeads(i){
  const layer = document.getElementById('layer'+i).value, sel = document.getElementById('head'+i);
  const n = DATA[i][layer].length - 1; sel.innerHTML = '<option value="mean">mean of heads</option>';
  for (let h = 0; h < n; h++) sel.innerHTML += '<option value="'+h+'">head '+h+'</option>';
  show(i);
}
for (let i = 0; i < DATA.length; i++) if (Object.keys(DATA[i]).length) fillHeads(i);
"""


def _section(i: int, item: ImageReport) -> str:
    esc = html.escape
    figs = [f'<figure><img src="{item.photo}" alt="input"><figcaption>input</figcaption></figure>']
    figs += [f'<figure><img src="{uri}" alt="{esc(m)}"><figcaption>{esc(m)}</figcaption></figure>'
             for m, uri in {**item.overlays, **item.extra}.items()]
    parts = [f'<section id="image{i}"><h2>{esc(item.name)}: {esc(item.label)}</h2>',
             f'<div class="row">{"".join(figs)}</div>']
    if item.attention:
        options = "".join(f'<option value="{esc(layer)}">{esc(layer)}</option>' for layer in item.attention)
        parts.append(f'<h2>attention by layer and head</h2>'
                     f'<select id="layer{i}" onchange="fillHeads({i})">{options}</select>'
                     f'<select id="head{i}" onchange="show({i})"></select>'
                     f'<div class="stack"><img class="photo" src="{item.photo}" alt="input">'
                     f'<img id="attn{i}" alt="attention map"></div>')
    parts.append("</section>")
    return "".join(parts)


def write_report(path: str, title: str, items: list[ImageReport], notes: list[str] = ()) -> str:
    """Write the page to ``path``; returns the path."""
    data = [item.attention for item in items]
    body = "".join(_section(i, item) for i, item in enumerate(items))
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{'<ul>' + note_html + '</ul>' if note_html else ''}{body}"
            f"<script type='application/json' id='attention-data'>{json.dumps(data)}</script>"
            f"<script>{_SCRIPT}</script></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
