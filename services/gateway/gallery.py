"""A self-contained HTML gallery of results (thumbnails embedded) for a person to open in a browser."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from services.gateway.client import Explanation, ImageHit, WordHit

THUMBNAIL = 160

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; background: #fafafa; color: #222; }
h1 { overflow-wrap: anywhere; font-size: 1.6em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 170px; background: #fff; border: 1px solid #ddd; padding: 5px; }
figure img { width: 160px; height: 160px; object-fit: contain; image-rendering: auto; background: #eee; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
.missing { width: 160px; height: 160px; display: flex; align-items: center; justify-content: center;
           background: #eee; font-size: 12px; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
"""


def thumbnail(path: str | Path) -> str | None:
    """A data: URI of a small PNG of the image, or None if it cannot be read here."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = THUMBNAIL / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except (OSError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure_html(path: str, caption: str) -> str:
    uri = thumbnail(path)
    picture = f'<img src="{uri}" alt="{html.escape(path)}">' if uri else '<div class="missing">not readable here</div>'
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def explanation_text(explanation: Explanation) -> str:
    """`dog +0.412 image +0.450; words: dog, puppy, ...; classes: beagle, ...`"""
    text = " ".join(f"{s.term} {s.share:+.3f}" for s in explanation.shares)
    text += "; words: " + ", ".join(w.word for w in explanation.words)
    if explanation.classes:
        text += "; classes: " + ", ".join(c.word for c in explanation.classes)
    return text


def render(title: str, images: list[ImageHit] | None = None, words: list[WordHit] | None = None,
           query_image: str | None = None) -> str:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style><h1>{html.escape(title)}</h1>"]
    if query_image:
        parts.append("<h2>Query</h2><div class='grid'>" + figure_html(query_image, html.escape(query_image)) + "</div>")
    if images is not None:
        parts.append(f"<h2>{len(images)} images</h2><div class='grid'>")
        for rank, hit in enumerate(images, 1):
            caption = f"{rank}. {html.escape(hit.id)}<br>{html.escape(hit.label or '')} {hit.score:.3f}"
            if hit.explanation is not None:
                caption += "<br><small>" + html.escape(explanation_text(hit.explanation)) + "</small>"
            parts.append(figure_html(hit.path, caption))
        parts.append("</div>")
    if words is not None:
        parts.append("<h2>Words</h2><table><tr><th>#</th><th>word</th><th>score</th></tr>")
        parts.extend(f"<tr><td>{rank}</td><td>{html.escape(hit.word)}</td><td>{hit.score:.3f}</td></tr>"
                     for rank, hit in enumerate(words, 1))
        parts.append("</table>")
    return "\n".join(parts) + "\n"
