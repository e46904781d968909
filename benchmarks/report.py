"""Turning measurements into table rows, and the Markdown and JSON reports."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import Measured

__all__ = [
    "Row",
    "Section",
    "Target",
    "fmt_rate",
    "note_of",
    "rate_of",
    "throughput_rows",
    "unavailable",
    "versus_cell",
    "write",
]


@dataclass(frozen=True)
class Target:
    """A goal for one candidate: at least ``minimum`` times the rate of ``versus``."""

    candidate: str
    versus: str
    minimum: float
    short_name: str
    """How the target cell names ``versus`` (the table is wide enough already)."""


@dataclass
class Row:
    """One line of the table."""

    candidate: str
    n: str
    result: str
    versus: str = ""
    target: str = ""
    note: str = ""


@dataclass
class Section:
    """One benchmark's rows, and its raw measurements for the JSON report."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    """Targets not met, as ``candidate: target`` lines for the summary."""

    def add_raw(self, measured: Sequence[Measured]) -> None:
        for m in measured:
            self.raw.append(
                {
                    "label": m.candidate.label,
                    "function": m.candidate.function,
                    "kwargs": m.candidate.kwargs,
                    "n": m.candidate.n,
                    "status": m.status,
                    "detail": m.detail,
                    "leftover_processes": m.leftovers,
                    "samples": m.samples,
                }
            )

    @property
    def errors(self) -> list[str]:
        return [f"{r['label']}: {r['detail']}" for r in self.raw if r["status"] == "error"]


def fmt_rate(rate: float) -> str:
    return f"{rate:,.0f} tasks/s"


def unavailable(m: Measured) -> str:
    """The result cell of a candidate that produced no numbers."""
    if m.status == "not installed":
        return "not installed"
    return f"error: {m.detail}" if m.detail else "error"


def rate_of(m: Measured) -> float | None:
    """Tasks per second from the median of the measured durations (seconds per sample)."""
    if not m.ok:
        return None
    return m.candidate.n / statistics.median(float(s) for s in m.samples)


def versus_cell(label: str, value: float | None, baseline_label: str, baseline: float | None) -> str:
    """The "vs baseline" cell: ``value / baseline``, or why there is none."""
    if label == baseline_label:
        return "1.00x (baseline)"
    if value is None or baseline is None:
        return "—"
    return f"{value / baseline:.2f}x"


def throughput_rows(
    section: Section,
    measured: Sequence[Measured],
    baseline: str,
    targets: Sequence[Target] = (),
) -> None:
    """Rows of tasks/s and the ratio to ``baseline``, with each target marked met or missed."""
    rates = {m.candidate.label: rate_of(m) for m in measured}
    for m in measured:
        label = m.candidate.label
        rate = rates[label]
        goals = []
        for target in targets:
            if target.candidate != label:
                continue
            versus = rates.get(target.versus)
            goal = f"≥ {target.minimum:g}x {target.short_name}"
            if rate is None or versus is None:
                goals.append(f"{goal}: not measured")
                continue
            ratio = rate / versus
            verdict = "met" if ratio >= target.minimum else "MISSED"
            goals.append(f"{goal}: {verdict} ({ratio:.2f}x)")
            if verdict == "MISSED":
                section.missed.append(f"{label}: {goal} (got {ratio:.2f}x)")
        section.rows.append(
            Row(
                candidate=label,
                n=f"{m.candidate.n:,}",
                result=fmt_rate(rate) if rate is not None else unavailable(m),
                versus=versus_cell(label, rate, baseline, rates.get(baseline)),
                target="; ".join(goals),
                note=note_of(m),
            )
        )
    section.add_raw(measured)


def note_of(m: Measured) -> str:
    """The candidate's note, plus any processes it left running."""
    if not m.leftovers:
        return m.candidate.note
    left = f"left {m.leftovers} process(es) running after shutdown"
    return f"{m.candidate.note}; {left}" if m.candidate.note else left


def render_markdown(sections: Sequence[Section], header: Sequence[str]) -> str:
    lines = ["# taskplex benchmarks", ""]
    for paragraph in header:
        lines += [paragraph, ""]
    lines.append("| Benchmark | Candidate | N | Result | vs baseline | Target | Notes |")
    lines.append("|---|---|---|---|---|---|---|")
    for section in sections:
        for index, row in enumerate(section.rows):
            title = f"**{section.title}** (`{section.name}`)" if index == 0 else ""
            cells = [title, row.candidate, row.n, row.result, row.versus, row.target, row.note]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    missed = [line for section in sections for line in section.missed]
    lines += ["", "Targets missed:" if missed else "Targets missed: none."]
    lines += [f"- {line}" for line in missed]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write(
    sections: Sequence[Section], header: Sequence[str], meta: dict[str, Any], directory: Path
) -> str:
    """Write ``bench.md`` and ``bench.json`` into ``directory``; return the Markdown."""
    markdown = render_markdown(sections, header)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.md").write_text(markdown)
    payload = {
        "meta": meta,
        "sections": [
            {"name": s.name, "title": s.title, "rows": [asdict(r) for r in s.rows], "raw": s.raw}
            for s in sections
        ],
    }
    (directory / "bench.json").write_text(json.dumps(payload, indent=1))
    return markdown
