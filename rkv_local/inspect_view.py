"""Rendering for ``rkv-local inspect``: which tokens each layer and KV head kept.

``collect`` reads the kept positions out of a ``Llama`` after a generation; ``render_terminal``
and ``render_html`` turn them into an ANSI-coloured listing and a standalone HTML page. The
renderers only see plain data (``InspectData``), so they are testable without a model.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["InspectData", "collect", "render_terminal", "render_html"]

# ANSI: kept tokens black on yellow, evicted ones dim; the prompt/generation border in cyan
_KEPT = "\x1b[30;43m"
_EVICTED = "\x1b[2m"
_MARK = "\x1b[36m"
_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"


@dataclass
class InspectData:
    """A sequence and, per (layer, KV head), the positions that head still holds."""

    model: str
    settings: str                       # one line: method, budget, buffer, ...
    texts: List[str]                    # text of the token at each position
    n_prompt: int                       # positions [0, n_prompt) are the prompt
    layers: List[int]                   # the layers shown: those the budget compresses (all without one)
    n_head_kv: int
    kept: Dict[Tuple[int, int], np.ndarray]  # (layer, head) -> sorted kept positions
    stats_line: str = ""
    notes: List[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.texts)

    def kept_mask(self, layer: int, head: int) -> np.ndarray:
        mask = np.zeros(self.n_tokens, dtype=bool)
        positions = np.asarray(self.kept[(layer, head)], dtype=np.int64)
        positions = positions[(positions >= 0) & (positions < self.n_tokens)]
        mask[positions] = True
        return mask


def shown_layers(llm) -> List[int]:
    """The layers an inspection shows: those the budget compresses (a sliding-window model's window
    layers keep llama.cpp's window, not a budget), every layer without a budget."""
    import llama_cpp

    return llm.compressed_layers() or list(range(int(llama_cpp.llama_model_n_layer(llm.model))))


def collect(llm, model: str, settings: str, n_prompt: int, stats_line: str = "") -> InspectData:
    """Read the sequence held by ``llm`` (an ``rkv_local.Llama``) and every head's kept positions."""
    import llama_cpp

    tokens = [int(t) for t in llm._input_ids]  # the evaluated tokens: exactly what the KV cache saw
    texts = [llm.detokenize([t], special=True).decode("utf-8", errors="replace") for t in tokens]
    layers = shown_layers(llm)
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(llm.model))
    kept = {
        (layer, head): np.sort(np.asarray(llm.kept_positions(layer, head), dtype=np.int64))
        for layer in layers
        for head in range(n_head_kv)
    }
    return InspectData(model, settings, texts, min(n_prompt, len(tokens)), layers, n_head_kv, kept, stats_line)


def _visible(text: str) -> str:
    """Token text for a terminal: newlines shown as ↵ (then broken), other control bytes escaped."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("↵\n")
        elif ch == "\t":
            out.append("→")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _head_summary(data: InspectData, layer: int, head: int) -> str:
    mask = data.kept_mask(layer, head)
    n_kept = int(mask.sum())
    prompt_kept = int(mask[: data.n_prompt].sum())
    return (f"{n_kept} of {data.n_tokens} tokens kept "
            f"({prompt_kept} of {data.n_prompt} prompt, {n_kept - prompt_kept} of "
            f"{data.n_tokens - data.n_prompt} generated)")


def render_terminal(
    data: InspectData, layer: int = 0, heads: Optional[Sequence[int]] = None, color: bool = True
) -> str:
    """The tokens of ``layer`` for each head in ``heads`` (default: all).

    With ``color``, kept tokens are highlighted and evicted ones dim; without it, evicted
    tokens are replaced by ``·`` (one per character) so the kept ones still stand out.
    """
    heads = list(range(data.n_head_kv)) if heads is None else list(heads)
    lines = [
        f"{data.model}: {data.settings}",
        f"{data.n_tokens} tokens in the sequence ({data.n_prompt} prompt, "
        f"{data.n_tokens - data.n_prompt} generated)" + (f"; {data.stats_line}" if data.stats_line else ""),
    ]
    lines += data.notes
    if color:
        lines.append(f"legend: {_KEPT}kept{_RESET} {_EVICTED}evicted{_RESET} {_MARK}▶{_RESET} generation starts")
    else:
        lines.append("legend: kept tokens as text, evicted ones as ·, ▶ generation starts")
    for head in heads:
        mask = data.kept_mask(layer, head)
        title = f"── layer {layer}, KV head {head}: {_head_summary(data, layer, head)} "
        lines.append("")
        lines.append((_BOLD + title + _RESET) if color else title)
        parts = []
        for pos, text in enumerate(data.texts):
            if pos == data.n_prompt and data.n_prompt < data.n_tokens:
                parts.append(f"{_MARK}▶{_RESET}" if color else "▶")
            shown = _visible(text)
            if color:
                style = _KEPT if mask[pos] else _EVICTED
                # colour each line of a multi-line token separately so the highlight never spills
                parts.append("\n".join(f"{style}{piece}{_RESET}" if piece else "" for piece in shown.split("\n")))
            else:
                parts.append(shown if mask[pos] else "".join("\n" if c == "\n" else "·" for c in shown))
        lines.append("".join(parts))
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 0.95em; margin: 0.8em 0 0.3em; font-weight: 600; }
.meta { color: #555; font-size: 0.9em; }
.legend span { margin-right: 1em; }
table.overview { border-collapse: collapse; font-size: 0.85em; }
table.overview td, table.overview th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
.tokens { font-family: ui-monospace, monospace; font-size: 12px; line-height: 1.7;
          white-space: pre-wrap; word-break: break-all; border: 1px solid #eee; padding: 4px; }
.tok { border-radius: 2px; }
.tok.kept { background: #ffd54f; color: #000; }
.tok.evicted { color: #bbb; }
.sep { color: #0097a7; font-weight: bold; }
.prompt-note { color: #0097a7; }
"""


def _span(text: str, pos: int, kept: bool, is_prompt: bool) -> str:
    where = "prompt" if is_prompt else "generated"
    state = "kept" if kept else "evicted"
    shown = html.escape(text.replace("\n", "↵\n"), quote=False)
    return f'<span class="tok {state}" title="position {pos} · {where} · {state}">{shown}</span>'


def render_html(data: InspectData) -> str:
    """A standalone page: an overview table, then one token grid per layer and KV head."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>rkv-local inspect: {esc(data.model)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>rkv-local inspect: {esc(data.model)}</h1>",
        f'<p class="meta">{esc(data.settings)}<br>{data.n_tokens} tokens in the sequence '
        f"({data.n_prompt} prompt, {data.n_tokens - data.n_prompt} generated)"
        + (f"<br>{esc(data.stats_line)}" if data.stats_line else "")
        + "".join(f"<br>{esc(note)}" for note in data.notes)
        + "</p>",
        '<p class="legend"><span class="tok kept legend-item">kept</span> <span class="tok evicted legend-item">evicted</span> '
        '<span class="sep">▶</span> generation starts; hover a token for its position</p>',
        '<table class="overview"><tr><th>layer</th>'
        + "".join(f"<th>head {h} kept</th>" for h in range(data.n_head_kv))
        + "<th>kept by every head</th></tr>",
    ]
    for layer in data.layers:
        masks = [data.kept_mask(layer, h) for h in range(data.n_head_kv)]
        every = int(np.logical_and.reduce(masks).sum()) if masks else 0
        out.append(
            f'<tr><td><a href="#layer-{layer}">{layer}</a></td>'
            + "".join(f"<td>{int(m.sum())}</td>" for m in masks)
            + f"<td>{every}</td></tr>"
        )
    out.append("</table>")
    for layer in data.layers:
        out.append(f'<section class="layer" id="layer-{layer}" data-layer="{layer}">')
        out.append(f"<h2>Layer {layer}</h2>")
        for head in range(data.n_head_kv):
            mask = data.kept_mask(layer, head)
            out.append(f'<div class="head" data-layer="{layer}" data-head="{head}">')
            out.append(f"<h3>KV head {head}: {esc(_head_summary(data, layer, head))}</h3>")
            spans = []
            for pos, text in enumerate(data.texts):
                if pos == data.n_prompt and data.n_prompt < data.n_tokens:
                    spans.append('<span class="sep" title="generation starts">▶</span>')
                spans.append(_span(text, pos, bool(mask[pos]), pos < data.n_prompt))
            out.append('<div class="tokens">' + "".join(spans) + "</div>")
            out.append("</div>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
