"""The notebook view of a ``DatasetProfile``: summary, column roles and sizes, token-length histogram, one row as
training sees it, warnings.

Plain HTML with inline styles and no script, image or plotting library, so it looks the same in JupyterLab,
VS Code, a static HTML export and an untrusted notebook (whose sanitizer drops <style> blocks).
"""

from __future__ import annotations

from html import escape

from qubrid_lab.training.dataset_profile import ROW_NUMBERING, DatasetProfile

WITHIN = "#4c78a8"  # bars of lengths a job keeps whole
OVER = "#e45756"  # bars past max_seq_length
MUTED = "#6b7280"
TRAINED = "#fde68a"  # the tokens the loss is taken on, in the example
RULE = "border-bottom:1px solid #e5e7eb"
BAR_PIXELS = 72
BINS = 24

BOX = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:13px;line-height:1.45;max-width:720px"
TABLE = "border-collapse:collapse;margin:4px 0 10px 0;width:100%"
CELL = f"padding:3px 10px 3px 0;text-align:left;vertical-align:top;{RULE}"
HEADING = "margin:10px 0 2px 0;font-size:13px;font-weight:600"


def render(profile: DatasetProfile) -> str:
    """The profile as one self-contained HTML fragment."""
    parts = [_title(profile), _summary(profile), _columns(profile)]
    if profile.token_lengths:
        parts.append(_histogram(profile))
    if profile.example:
        parts.append(_example(profile))
    parts.append(_warnings(profile))
    parts.append(f'<div style="color:{MUTED};font-size:11px;margin-top:6px">{escape(ROW_NUMBERING)}</div>')
    return f'<div class="qubrid-lab-profile" style="{BOX}">{"".join(parts)}</div>'


def _title(profile: DatasetProfile) -> str:
    task = escape(profile.task_type) if profile.task_type else "no task type fits"
    return (
        f'<div style="font-size:15px;font-weight:600;margin-bottom:4px">Dataset profile '
        f'<span style="color:{MUTED};font-weight:400">· {profile.rows} rows · {task}</span></div>'
    )


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> str:
    """A table of already-escaped cells."""
    head = ""
    if header:
        head = "<tr>" + "".join(f'<th style="{CELL};color:{MUTED};font-weight:500">{h}</th>' for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f'<td style="{CELL}">{cell}</td>' for cell in row) + "</tr>" for row in rows)
    return f'<table style="{TABLE}">{head}{body}</table>'


def _summary(profile: DatasetProfile) -> str:
    rows = [
        ("Rows", f"{profile.rows} in the file, <b>{profile.trainable_rows}</b> usable for training"),
        ("Empty required cells", _rows_cell(profile.empty_rows)),
        ("Duplicate rows", _rows_cell(profile.duplicate_rows)),
    ]
    if profile.token_lengths:
        over = sum(length > profile.max_seq_length for length in profile.token_lengths)
        context = f" (model context {profile.context_length})" if profile.context_length else ""
        rows += [
            (
                "Tokens per row",
                " · ".join(
                    f"{name} {value}"
                    for name, value in (
                        ("min", min(profile.token_lengths)),
                        ("median", profile.length_percentile(0.5)),
                        ("p95", profile.length_percentile(0.95)),
                        ("max", max(profile.token_lengths)),
                    )
                ),
            ),
            (f"Longer than max_seq_length {profile.max_seq_length}", f"{over} ({profile.over_max_share:.1%})"),
            ("Suggested max_seq_length", f"<b>{profile.suggested_max_seq_length}</b>{context}"),
            (
                "Steps per epoch",
                (
                    f"<b>{profile.steps_per_epoch}</b> at batch_size {profile.batch_size}, "
                    f"validation_split {profile.validation_split:g} (one device)"
                ),
            ),
        ]
    rows.append(("Tokenizer", escape(profile.model)))
    return _table([(f'<span style="color:{MUTED}">{escape(name)}</span>', value) for name, value in rows])


def _rows_cell(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    shown = ", ".join(map(str, numbers[:12])) + (f", … ({len(numbers) - 12} more)" if len(numbers) > 12 else "")
    return f'{len(numbers)} <span style="color:{MUTED}">({"row" if len(numbers) == 1 else "rows"} {shown})</span>'


def _columns(profile: DatasetProfile) -> str:
    roles = profile.roles()
    rows = [
        (
            f"<code>{escape(stats.name)}</code>",
            escape(roles.get(stats.name, "—")),
            str(stats.empty),
            f"{stats.min_chars} / {stats.mean_chars:g} / {stats.max_chars}",
        )
        for stats in profile.column_stats
    ]
    return f'<div style="{HEADING}">Columns</div>' + _table(
        rows, ("Column", "Role", "Empty", "Characters min / mean / max")
    )


def _histogram(profile: DatasetProfile) -> str:
    """Token lengths as a bar chart made of table cells; bars past max_seq_length in red."""
    bins = profile.length_histogram(BINS)
    tallest = max(count for _, _, count in bins)
    bars = []
    for start, end, count in bins:
        height = round(BAR_PIXELS * count / tallest) if count else 0
        color = OVER if start > profile.max_seq_length else WITHIN
        tip = f"{start}-{end - 1} tokens: {count} rows"
        bars.append(
            f'<td title="{tip}" style="vertical-align:bottom;padding:0 1px;height:{BAR_PIXELS}px">'
            f'<div style="height:{max(height, 1 if count else 0)}px;background:{color};'
            f'border-radius:2px 2px 0 0"></div></td>'
        )
    limit = profile.max_seq_length
    note = (
        f'max_seq_length {limit}, <span style="color:{OVER}">■</span> longer rows are cut'
        if bins[-1][1] > limit + 1
        else f"all rows within max_seq_length {limit}"
    )
    axis = (
        f'<div style="display:flex;justify-content:space-between;color:{MUTED};font-size:11px">'
        f"<span>{bins[0][0]}</span><span>tokens per row ({note})</span><span>{bins[-1][1] - 1}</span></div>"
    )
    return (
        f'<div style="{HEADING}">Token lengths <span style="color:{MUTED};font-weight:400">'
        f"(chat template included, before truncation; {len(profile.token_lengths)} rows)</span></div>"
        f'<table style="border-collapse:collapse;width:100%;table-layout:fixed;border-bottom:1px solid #9ca3af">'
        f"<tr>{''.join(bars)}</tr></table>{axis}"
    )


def _example(profile: DatasetProfile) -> str:
    """The first trainable row as the model is trained on it; the highlighted text is what the loss sees."""
    text = "".join(
        f'<span style="background:{TRAINED};border-radius:2px">{escape(piece)}</span>'
        if trained
        else f'<span style="color:{MUTED}">{escape(piece)}</span>'
        for piece, trained in profile.example
    )
    return (
        f'<div style="{HEADING}">Row {profile.example_row} as training sees it '
        f'<span style="color:{MUTED};font-weight:400">(highlighted: the tokens the loss is taken on)</span></div>'
        f'<div style="white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px;'
        f'border:1px solid #e5e7eb;padding:6px;margin:2px 0 8px 0">{text}</div>'
    )


def _warnings(profile: DatasetProfile) -> str:
    if not profile.warnings:
        return f'<div style="{HEADING};color:#15803d">✓ No warnings</div>'
    items = "".join(f'<li style="margin:2px 0">{escape(warning.message)}</li>' for warning in profile.warnings)
    return (
        f'<div style="{HEADING};color:#b45309">⚠ {len(profile.warnings)} warning'
        f'{"" if len(profile.warnings) == 1 else "s"}</div><ul style="margin:2px 0 0 18px;padding:0">{items}</ul>'
    )
