"""The evaluation report a clinician reads: Markdown and HTML from one document model, plus JSON, a
per-case CSV and PNG plots.

The document is built once as a list of blocks (heading, paragraph, list, table, image) and rendered to
both formats, so Markdown and HTML always say the same thing. HTML uses ``string.Template`` and
``html.escape``: no template engine dependency.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from dicomnode.lifecycle.evaluation.metrics import Interval, LabelMetrics
from dicomnode.lifecycle.evaluation.plots import plot_reliability, plot_roc

if TYPE_CHECKING:
    from dicomnode.lifecycle.evaluation.core import EvaluationResult

logger = logging.getLogger(__name__)

SUBGROUP_TITLES = {
    "sex": "Patient sex",
    "age_band": "Age band (years)",
    "view_position": "View position",
    "manufacturer": "Manufacturer",
}


def format_value(value: float | None, digits: int = 2) -> str:
    """A number, or 'undefined' for None."""
    return "undefined" if value is None else f"{value:.{digits}f}"


def format_estimate(value: float | None, ci: Interval | None, digits: int = 2) -> str:
    """``'0.91 (95% CI 0.80–0.98)'``, ``'1.00 (CI not estimable)'`` or 'undefined'."""
    if value is None:
        return "undefined"
    if ci is None:
        return f"{value:.{digits}f} (CI not estimable)"
    return f"{value:.{digits}f} (95% CI {ci.low:.{digits}f}–{ci.high:.{digits}f})"


def _fraction(value: float | None, ci: Interval | None, num: int, den: int) -> str:
    return f"{format_estimate(value, ci)}, {num}/{den}" if value is not None else "undefined (0 cases)"


# --- document model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    src: str  # relative to the report
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """The document as GitHub-flavoured Markdown."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in block.header) + " |"]
            lines.append("|" + "|".join("---" for _ in block.header) + "|")
            lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows)
            out.append("\n".join(lines))
        else:
            out.append(f"![{block.alt}]({block.src})")
    return "\n\n".join(out) + "\n"


_PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>$title</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #bbb; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #eee; }
img { max-width: 28rem; margin: 0.5rem 1rem 0.5rem 0; }
</style>
</head>
<body>
$body
</body>
</html>
"""
)


def render_html(blocks: list[Block], title: str) -> str:
    """The document as a standalone HTML page."""
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            parts.append(f'<img src="{html.escape(block.src)}" alt="{html.escape(block.alt)}">')
    return _PAGE.substitute(title=html.escape(title), body="\n".join(parts))


# --- content --------------------------------------------------------------------------------------


def _headline(m: LabelMetrics) -> Table:
    rows = (
        (
            "AUROC",
            format_estimate(m.auroc, m.auroc_ci),
            "chance that a random positive image scores higher than a random negative one (0.5 = chance)",
        ),
        (
            f"Sensitivity at threshold {m.threshold:.2f}",
            _fraction(m.sensitivity, m.sensitivity_ci, m.tp, m.tp + m.fn),
            "share of positive images the model calls positive",
        ),
        (
            "Specificity",
            _fraction(m.specificity, m.specificity_ci, m.tn, m.tn + m.fp),
            "share of negative images the model calls negative",
        ),
        (
            "PPV",
            _fraction(m.ppv, m.ppv_ci, m.tp, m.tp + m.fp),
            "share of positive calls that are right (depends on this test set's prevalence)",
        ),
        (
            "NPV",
            _fraction(m.npv, m.npv_ci, m.tn, m.tn + m.fn),
            "share of negative calls that are right (depends on this test set's prevalence)",
        ),
        ("Brier score", format_value(m.brier, 3), "mean squared error of the probability (0 is perfect)"),
        (
            "ECE",
            format_value(m.ece, 3),
            "average gap between predicted probability and observed frequency (0 is perfect)",
        ),
    )
    return Table(("Measure", "Value", "Meaning"), rows)


def _confusion(m: LabelMetrics) -> Table:
    return Table(
        ("", "Truth: positive", "Truth: negative"),
        (
            ("Model: positive", f"{m.tp} (true positive)", f"{m.fp} (false positive)"),
            ("Model: negative", f"{m.fn} (false negative)", f"{m.tn} (true negative)"),
        ),
    )


def _calibration(m: LabelMetrics) -> Table:
    rows = tuple(
        (
            f"{b.low:.1f}–{b.high:.1f}",
            str(b.count),
            format_value(b.mean_probability),
            format_value(b.observed_fraction),
        )
        for b in m.reliability
        if b.count
    )
    return Table(("Probability bin", "Images", "Mean probability", "Observed fraction positive"), rows)


def _subgroup_table(result: EvaluationResult, label: str) -> Table:
    rows = []
    for attribute, groups in result.subgroups.items():
        for g in groups:
            m = g.metrics[label]
            rows.append(
                (
                    SUBGROUP_TITLES.get(attribute, attribute),
                    g.group,
                    str(g.n_cases),
                    f"{m.n_positive}/{m.n_negative}",
                    format_estimate(m.auroc, m.auroc_ci),
                    format_estimate(m.sensitivity, m.sensitivity_ci),
                    format_estimate(m.specificity, m.specificity_ci),
                    format_value(m.ece, 3),
                )
            )
    return Table(
        ("Subgroup", "Group", "Images", "Positives/negatives", "AUROC", "Sensitivity", "Specificity", "ECE"),
        tuple(rows),
    )


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "label"


def build_document(result: EvaluationResult, plots: dict[str, dict[str, str]]) -> list[Block]:
    """The report's blocks; ``plots`` maps label -> {"roc", "reliability"} -> relative PNG path."""
    s = result.settings
    blocks: list[Block] = [
        Heading(1, "Model evaluation report"),
        Paragraph(
            f"{result.n_cases} images, labels: {', '.join(result.labels)}. An image counts as positive "
            "when the model's probability is at or above the label's threshold. Intervals are 95 % "
            f"confidence intervals: AUROC by percentile bootstrap ({s.n_bootstrap} resamples, "
            f"seed {s.seed}), proportions by the Wilson score method."
        ),
        Heading(2, "Read this first"),
        Bullets(
            tuple(result.caveats)
            or ("No small-sample warnings. These numbers still describe this test set only.",)
        ),
    ]
    for label in result.labels:
        m = result.overall[label]
        blocks += [
            Heading(2, f"{label}"),
            Paragraph(
                f"{m.n} images with a known truth: {m.n_positive} positive, {m.n_negative} negative. "
                f"Threshold {m.threshold:.2f}."
            ),
            _headline(m),
            Heading(3, f"Confusion matrix at threshold {m.threshold:.2f}"),
            _confusion(m),
            Heading(3, "Calibration"),
            Paragraph(
                f"Expected calibration error {format_value(m.ece, 3)} over {s.n_bins} equal-width "
                "probability bins: the image-weighted average of |observed fraction positive − "
                "mean probability| per bin. "
                "Points on the diagonal are well calibrated."
            ),
            _calibration(m),
        ]
        if label in plots:
            blocks += [
                Image(plots[label]["roc"], f"ROC curve for {label}"),
                Image(plots[label]["reliability"], f"Reliability diagram for {label}"),
            ]
        blocks += [
            Heading(3, "Subgroups"),
            Paragraph(
                "The same measures on each subgroup. 'undefined' means the subgroup holds only one class "
                "(or no images) for that measure. Small subgroups have wide intervals."
            ),
            _subgroup_table(result, label),
        ]
    blocks += [
        Heading(2, "Files"),
        Bullets(
            (
                "per_case.csv: one row per image and label (path, SOP Instance UID, probability, truth)",
                "evaluation.json: every number in this report, machine-readable",
            )
        ),
    ]
    return blocks


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` wrote each output."""

    markdown: Path
    html: Path
    json: Path
    per_case_csv: Path
    plots: dict[str, dict[str, Path]]


def write_per_case_csv(result: EvaluationResult, path: Path) -> Path:
    """One row per image and label: path, sop_instance_uid, label, probability, truth, predicted."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "sop_instance_uid", "label", "probability", "truth", "predicted"])
        for case in result.cases:
            for label in result.labels:
                if label not in case.probabilities:
                    continue
                probability = float(case.probabilities[label])
                truth = case.truths.get(label)
                writer.writerow(
                    [
                        case.path,
                        case.sop_instance_uid,
                        label,
                        f"{probability:.6f}",
                        "" if truth is None else int(truth),
                        int(probability >= result.thresholds[label]),
                    ]
                )
    return path


def write_report(result: EvaluationResult, out_dir: str | Path) -> ReportFiles:
    """Write report.md, report.html, evaluation.json, per_case.csv and per-label PNG plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, dict[str, Path]] = {}
    for label in result.labels:
        m = result.overall[label]
        name = _safe_name(label)
        plots[label] = {
            "roc": plot_roc(m, out / f"roc_{name}.png"),
            "reliability": plot_reliability(m, out / f"reliability_{name}.png"),
        }
    relative = {label: {kind: p.name for kind, p in files.items()} for label, files in plots.items()}
    blocks = build_document(result, relative)
    markdown = out / "report.md"
    markdown.write_text(render_markdown(blocks), encoding="utf-8")
    page = out / "report.html"
    page.write_text(render_html(blocks, "Model evaluation report"), encoding="utf-8")
    data = out / "evaluation.json"
    data.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
    per_case = write_per_case_csv(result, out / "per_case.csv")
    logger.info("evaluation report written for %d images, %d labels", result.n_cases, len(result.labels))
    return ReportFiles(markdown=markdown, html=page, json=data, per_case_csv=per_case, plots=plots)
