"""`dicomnode compare`: agreement, kappa, correlations and AUROC of two models from the results
table, on every backend (real SQLite file, real PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomnode.cli import main
from dicomnode.db import Job, JobState, Study
from dicomnode.findings import CodedConcept, ImageFindings, LabelFinding, ModelIdentity, StudyFindings
from dicomnode.lifecycle.evaluation.compare import (
    CompareError,
    ModelRef,
    cohen_kappa,
    compare,
    paired_results,
    parse_since,
)
from dicomnode.node.services import Services
from dicomnode.queue.results import ResultStore

CONCEPT = CodedConcept("233604007", "SCT", "Pneumonia")


def findings(
    study: str, version: str, scores: dict[str, float | None], threshold: float = 0.5
) -> StudyFindings:
    """One model's findings on the images ``scores`` names (None: refused, out of distribution)."""
    images = []
    for sop, score in scores.items():
        found = (
            ()
            if score is None
            else (LabelFinding("pneumonia", "Pneumonia", CONCEPT, score, threshold, score >= threshold),)
        )
        images.append(
            ImageFindings(sop, "1.2.840.10008.5.1.4.1.1.1", f"{study}.1", "x.dcm", found,
                          refusal="refused: out-of-distribution" if score is None else None)
        )  # fmt: skip
    return StudyFindings(study, ModelIdentity("m", version, "M"), tuple(images), (), None)


def add_job(services: Services, study: str) -> int:
    with services.sessions.begin() as session:
        row = Study(study_instance_uid=study)
        session.add(row)
        session.flush()
        job = Job(study_id=row.id, state=JobState.DONE)
        session.add(job)
        session.flush()
        return job.id


def test_statistics_and_arguments() -> None:
    """Kappa against a worked example, undefined kappa, --since units, model names."""
    # 10 images: 4 both yes, 4 both no, 2 disagree: po 0.8, pe 0.5 -> kappa 0.6
    a = [True] * 5 + [False] * 5
    b = [True] * 4 + [False] + [True] + [False] * 4
    assert cohen_kappa(a, b) == pytest.approx(0.6)
    assert cohen_kappa([True, True], [True, True]) is None
    assert parse_since("7d").days == 7 and parse_since("12h").total_seconds() == 12 * 3600
    assert parse_since("30m").total_seconds() == 1800
    with pytest.raises(CompareError, match="7d, 12h, 30m"):
        parse_since("7 weeks")
    assert ModelRef.parse("m@0.4") == ModelRef("m", "0.4") and ModelRef.parse("m") == ModelRef("m")
    with pytest.raises(CompareError):
        ModelRef.parse("m@")


def test_compare_reads_both_models_results_and_counts_refusals(backend_services: Services) -> None:
    """Two jobs, each with a reporting row (m 1) and a shadow row (m 2): images matched by UID,
    refused images counted apart, a shadow's error row skipped, labels by study or image UID."""
    store = ResultStore(backend_services.sessions)
    job1, job2 = add_job(backend_services, "1.1"), add_job(backend_services, "1.2")
    with backend_services.queue.transaction() as session:
        store.add(session, job1, findings("1.1", "1", {"a": 0.9, "b": 0.2, "c": None}), [])
        store.add(session, job2, findings("1.2", "1", {"d": 0.7, "e": 0.1}), [])
    store.add_shadow(job1, findings("1.1", "2", {"a": 0.8, "b": 0.6, "c": 0.4}))
    store.add_shadow(job2, findings("1.2", "2", {"d": 0.9, "e": 0.05}))
    store.add_shadow(job2, findings("1.2", "2", {"d": 0.9, "e": 0.05}))  # a retry replaces its row
    since = parse_since("1h")
    from datetime import UTC, datetime

    pairs = paired_results(
        backend_services.sessions, ModelRef("m"), ModelRef("m", "2"), datetime.now(UTC) - since
    )
    assert len(pairs) == 2 and {a.model.version for a, _ in pairs} == {"1"}
    result = compare(
        pairs,
        "m",
        "m@2",
        "1h",
        {"1.1": {"pneumonia": 1}, "e": {"pneumonia": 0}, "d": {"pneumonia": 1}},
        "x.csv",
    )
    assert (result.jobs, result.refused_a, result.refused_b, result.refused_both) == (2, 1, 0, 0)
    (label,) = result.labels
    assert (label.images, label.studies) == (4, 2)
    assert label.agreement == pytest.approx(0.75)  # b: 0.2- against 0.6+
    assert label.spearman == pytest.approx(0.8) and label.pearson is not None
    assert label.mean_absolute_difference == pytest.approx((0.1 + 0.4 + 0.2 + 0.05) / 4)
    assert label.labelled_images == 4 and label.auroc_a == pytest.approx(1.0)
    assert label.auroc_b == pytest.approx(1.0)


def test_compare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command names a bad --since and a labels CSV without a key column; an empty database
    compares nothing."""
    from test_cli import write_config

    path = write_config(tmp_path)
    assert main(["--config", str(path), "db", "upgrade"]) == 0
    capsys.readouterr()
    assert main(["--config", str(path), "compare", "m@1", "m@2", "--since", "7w"]) == 1
    assert "--since '7w'" in capsys.readouterr().err
    labels = tmp_path / "labels.csv"
    labels.write_text("path,pneumonia\nx.dcm,1\n", encoding="utf-8")
    assert main(["--config", str(path), "compare", "m@1", "m@2", "--labels", str(labels)]) == 1
    assert "sop_instance_uid or study_instance_uid" in capsys.readouterr().err
    assert main(["--config", str(path), "compare", "m@1", "m@2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == 0
