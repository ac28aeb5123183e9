"""Showing a row's token table: a coloured rich table in a terminal, plain text elsewhere, a styled pandas table in
a notebook. The table itself comes from `ki_data.inspect.token_table`.

Colours (the same in all three): prefix (the text prompt the action expert also sees) blue, the postfix's text
(`Action: `, `|`, EOS) yellow, FAST ids magenta, padding dim.
"""

from __future__ import annotations

import io
import sys
from typing import Any, Iterable

from ki_data.inspect import FastDecode, TokenRecord

RICH_STYLE = {"prefix": "cyan", "postfix": "yellow", "fast": "magenta", "pad": "bright_black"}
HTML_BACKGROUND = {"prefix": "#dbeafe", "postfix": "#fde68a", "fast": "#f5d0fe", "pad": "#f3f4f6"}
HEADERS = ("pos", "segment", "id", "piece", "text_id", "text_piece", "mask", "ar", "loss", "text_mask")


def colour_key(record: TokenRecord) -> str:
    """Which colour a position gets: its segment, with FAST ids of the postfix set apart."""
    return "fast" if record.kind == "fast" else record.segment


def show_piece(piece: str | None) -> str:
    """A piece with control characters made visible (sentencepiece's ▁ already is)."""
    if piece is None:
        return ""
    return piece.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _flag(value: bool | None) -> str:
    return "" if value is None else "1" if value else "0"


def record_cells(record: TokenRecord) -> tuple[str, ...]:
    return (
        str(record.position),
        record.segment,
        str(record.token_id),
        show_piece(record.piece),
        "" if record.text_id is None else str(record.text_id),
        show_piece(record.text_piece),
        _flag(record.tokenized_prompt_mask),
        _flag(record.token_ar_mask),
        _flag(record.token_loss_mask),
        _flag(record.text_prompt_mask),
    )


def visible_records(
    records: list[TokenRecord], *, limit: int | None = None, pad_rows: int = 1
) -> tuple[list[TokenRecord], int]:
    """The positions worth showing: every real token (a position real in either prompt) and the first `pad_rows`
    padding positions, cut at `limit` rows. Returns them and how many positions were left out."""
    shown, pads = [], 0
    for r in records:
        real = r.tokenized_prompt_mask or bool(r.text_prompt_mask)
        if not real:
            pads += 1
            if pads > pad_rows:
                continue
        shown.append(r)
    if limit is not None:
        shown = shown[: max(limit, 0)]
    return shown, len(records) - len(shown)


def _sections(records: Iterable[TokenRecord]) -> Iterable[tuple[bool, TokenRecord]]:
    """Each record with whether a new segment starts at it (where the tables draw their boundary)."""
    previous = None
    for r in records:
        yield previous is not None and r.segment != previous, r
        previous = r.segment


def row_header_lines(summary: dict[str, Any], text: dict[str, Any], decode: FastDecode | None) -> list[str]:
    """The lines above the table: where the row is, its lengths, the prompt as text, the FAST round trip."""
    lines = [
        f"{summary['dataset'] or 'dataset'}  split={summary['split']}  episode={summary['episode']}  "
        f"frame={summary['frame']}  index={summary['index']}",
        f"task: {summary['task']!r}",
        f"tokenized_prompt: {summary['prompt_length']}/{summary['max_token_len']} tokens "
        f"({summary['fast_tokens']} FAST)   text_prompt: {summary['text_length']}/{summary['max_text_len']}   "
        f"padded action steps: {summary['padded_steps']}",
        f"prefix text: {text['prefix']!r}",
    ]
    if decode is not None:
        lines.append(
            f"FAST postfix -> chunk: max |decoded - stored| = {decode.max_error:.4f} normalized "
            f"(rounding bound {decode.bound:.4f}); per dim in data units: "
            + ", ".join(f"{e:.4g}" for e in decode.max_action_error)
        )
    return lines


def token_table_text(records: list[TokenRecord], *, limit: int | None = None, pad_rows: int = 1) -> str:
    """The token table as plain fixed-width text, a rule at each prefix/postfix/pad boundary."""
    shown, hidden = visible_records(records, limit=limit, pad_rows=pad_rows)
    rows = [record_cells(r) for r in shown]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(HEADERS)]

    def line(cells: Iterable[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(HEADERS), line("-" * w for w in widths)]
    for (starts, r), cells in zip(_sections(shown), rows):
        if starts:
            out.append(f"---- {r.segment} " + "-" * max(0, sum(widths) + 2 * len(widths) - 8 - len(r.segment)))
        out.append(line(cells))
    if hidden:
        out.append(f"... {hidden} more positions not shown")
    return "\n".join(out)


def token_table_rich(records: list[TokenRecord], *, limit: int | None = None, pad_rows: int = 1, title: str = ""):
    """The token table as a rich Table, coloured by segment, a section line at each boundary."""
    from rich.table import Table
    from rich.text import Text

    shown, hidden = visible_records(records, limit=limit, pad_rows=pad_rows)
    table = Table(title=title or None, caption=f"{hidden} more positions not shown" if hidden else None)
    for h in HEADERS:
        table.add_column(h, justify="right" if h in ("pos", "id", "text_id") else "left", no_wrap=True)
    for starts, r in _sections(shown):
        if starts:
            table.add_section()
        # Text objects, not markup: pieces such as "[" must not be read as style tags.
        table.add_row(*(Text(c) for c in record_cells(r)), style=RICH_STYLE[colour_key(r)])
    return table


def print_token_table(
    records: list[TokenRecord],
    header: list[str] | None = None,
    *,
    file: io.TextIOBase | None = None,  # sys.stdout, a StringIO, ...
    color: str = "auto",
    limit: int | None = None,
    pad_rows: int = 1,
    width: int = 140,
) -> None:
    """Print header lines and the table: rich with colour on a terminal (or color="always"), plain text otherwise."""
    file = sys.stdout if file is None else file
    use_rich = color == "always" or (color == "auto" and hasattr(file, "isatty") and file.isatty())
    if not use_rich:
        for h in header or []:
            print(h, file=file)
        print(token_table_text(records, limit=limit, pad_rows=pad_rows), file=file)
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(file=file, force_terminal=True, width=max(width, 60), highlight=False)
    for h in header or []:
        console.print(Text(h))
    legend = Text("  ").join(Text(name, style=RICH_STYLE[name]) for name in ("prefix", "postfix", "fast", "pad"))
    console.print(Text("colours: ") + legend)
    console.print(token_table_rich(records, limit=limit, pad_rows=pad_rows))


def rendered_token_table(records: list[TokenRecord], header: list[str] | None = None, **kw) -> str:
    """What `print_token_table` prints, as a string."""
    buf = io.StringIO()
    print_token_table(records, header, file=buf, **kw)
    return buf.getvalue()


def style_token_table(frame):
    """A pandas Styler for `inspect.token_table_frame(...)`: rows coloured by segment / FAST, a bold line where the
    postfix starts, masks as 1/0."""
    segments = frame["segment"].tolist()
    kinds = frame["kind"].tolist()
    starts = [i > 0 and segments[i] != segments[i - 1] for i in range(len(segments))]

    def row_style(row):
        i = frame.index.get_loc(row.name)
        key = "fast" if kinds[i] == "fast" else segments[i]
        css = f"background-color: {HTML_BACKGROUND[key]}; color: {'#9ca3af' if key == 'pad' else '#111827'}"
        if starts[i]:
            css += "; border-top: 3px solid #111827"
        return [css] * len(row)

    bool_cols = [c for c in ("tokenized_prompt_mask", "token_ar_mask", "token_loss_mask", "text_prompt_mask")
                 if c in frame.columns]
    return (
        frame.style.apply(row_style, axis=1)
        .format({c: lambda v: "" if v is None or v != v else str(int(v)) for c in bool_cols})
        .format({"piece": show_piece, "text_piece": show_piece}, na_rep="")
        .format(na_rep="", subset=[c for c in ("fast_id", "text_id") if c in frame.columns])
    )


def legend_html() -> str:
    """A one-line colour key for the notebook."""
    names = {"prefix": "prefix (text prompt, bidirectional)", "postfix": "postfix text (Action: | EOS)",
             "fast": "FAST ids (postfix, loss targets)", "pad": "padding"}
    spans = [
        f'<span style="background:{HTML_BACKGROUND[k]};padding:2px 8px;margin-right:6px">{v}</span>'
        for k, v in names.items()
    ]
    return "<div>" + "".join(spans) + "</div>"
