"""Evaluation metrics checked against independent hand computations; subgroups, plots and reports."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from sklearn.metrics import roc_auc_score

from dicomnode.lifecycle.datasets import load_labelled_dataset
from dicomnode.lifecycle.evaluation import (
    CaseResult,
    EvaluationResult,
    choose_threshold,
    evaluate,
    write_report,
)
from dicomnode.lifecycle.evaluation.metrics import bootstrap_auroc_ci, label_metrics, mann_whitney_auroc
from dicomnode.lifecycle.evaluation.subgroups import age_band, sex_group

# A hand-worked example (see the comments in the tests for the arithmetic).
PROBS = [0.05, 0.15, 0.35, 0.40, 0.40, 0.62, 0.70, 0.85, 0.90, 0.95]
TRUTHS = [0, 0, 1, 0, 1, 0, 1, 0, 1, 1]
Z95 = 1.959963984540054


def pairwise_auroc(probs: list[float], truths: list[int]) -> float:
    """Mann-Whitney by counting: share of (positive, negative) pairs ranked correctly, ties count 1/2."""
    pos = [p for p, t in zip(probs, truths, strict=True) if t == 1]
    neg = [p for p, t in zip(probs, truths, strict=True) if t == 0]
    score = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return score / (len(pos) * len(neg))


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval written out."""
    p = k / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 / denom * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    return centre - half, centre + half


def test_auroc_confusion_and_ratios_match_hand_computation() -> None:
    """AUROC, confusion matrix (p >= threshold is positive), sensitivity, specificity, PPV, NPV."""
    m = label_metrics("x", PROBS, TRUTHS, threshold=0.40, n_bootstrap=200)
    # positives 0.35, 0.40, 0.70, 0.90, 0.95 beat 2, 2.5, 4, 5, 5 of the 5 negatives: 18.5 / 25
    assert pairwise_auroc(PROBS, TRUTHS) == pytest.approx(0.74)
    assert m.auroc == pytest.approx(0.74)
    # at 0.40 the tied pair (0.40 negative, 0.40 positive) are both called positive
    assert (m.tp, m.fp, m.tn, m.fn) == (4, 3, 2, 1)
    assert (m.n, m.n_positive, m.n_negative) == (10, 5, 5)
    assert m.sensitivity == pytest.approx(0.8)
    assert m.specificity == pytest.approx(0.4)
    assert m.ppv == pytest.approx(4 / 7)
    assert m.npv == pytest.approx(2 / 3)
    assert m.sensitivity_ci is not None and m.specificity_ci is not None
    assert (m.sensitivity_ci.low, m.sensitivity_ci.high) == pytest.approx(wilson(4, 5))
    assert (m.specificity_ci.low, m.specificity_ci.high) == pytest.approx(wilson(2, 5))
    assert m.ppv_ci is not None and (m.ppv_ci.low, m.ppv_ci.high) == pytest.approx(wilson(4, 7))


def test_calibration_and_brier_match_hand_computation() -> None:
    """ECE over 10 equal-width bins and the Brier score, worked out by hand."""
    m = label_metrics("x", PROBS, TRUTHS, threshold=0.5, n_bootstrap=0)
    # bin gaps |observed - mean p| x count: 0.05, 0.15, 0.65, 2x0.10, 0.62, 0.30, 0.85, 2x0.075 -> 2.97 / 10
    assert m.ece == pytest.approx(0.297)
    # squared errors: .0025 .0225 .4225 .16 .36 .3844 .09 .7225 .01 .0025 -> 2.1769 / 10
    assert m.brier == pytest.approx(0.21769)
    counts = [b.count for b in m.reliability]
    assert counts == [1, 1, 0, 1, 2, 0, 1, 1, 1, 2]
    bin4 = m.reliability[4]
    assert (bin4.low, bin4.high, bin4.mean_probability, bin4.observed_fraction) == pytest.approx(
        (0.4, 0.5, 0.4, 0.5)
    )
    assert m.reliability[2].mean_probability is None and m.reliability[2].observed_fraction is None
    # p = 1.0 belongs to the last bin
    assert label_metrics("x", [1.0, 0.0], [1, 0], 0.5, n_bootstrap=0).reliability[-1].count == 1


def test_bootstrap_ci_matches_an_independent_resampling() -> None:
    """Percentile CI and skipped count equal a loop over the same resamples using roc_auc_score."""
    probs = np.array([0.1, 0.3, 0.35, 0.5, 0.5, 0.6, 0.8, 0.2])
    truths = np.array([0, 0, 1, 0, 0, 0, 1, 0])  # 2 positives in 8: many resamples hold one class
    ci, skipped = bootstrap_auroc_ci(probs, truths, n_resamples=300, seed=7)
    indices = np.random.default_rng(7).integers(0, 8, size=(300, 8))
    aucs = [roc_auc_score(truths[i], probs[i]) for i in indices if 0 < truths[i].sum() < 8]
    assert skipped == 300 - len(aucs) and skipped > 0
    assert ci is not None
    assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(aucs, [2.5, 97.5])))
    assert bootstrap_auroc_ci(probs, truths, n_resamples=300, seed=7) == (ci, skipped)  # deterministic


def test_vectorised_auroc_equals_sklearn_with_ties() -> None:
    """The rank formula used for resamples equals roc_auc_score, ties included."""
    rng = np.random.default_rng(0)
    probs = np.round(rng.random((40, 30)), 1)  # coarse values: many ties
    truths = rng.integers(0, 2, size=(40, 30))
    expected = [roc_auc_score(t, p) for p, t in zip(probs, truths, strict=True)]
    assert mann_whitney_auroc(probs, truths) == pytest.approx(expected)


def test_one_class_gives_undefined_metrics_not_errors() -> None:
    """With only negatives, AUROC and sensitivity are None; specificity is still defined."""
    m = label_metrics("x", [0.1, 0.7, 0.2], [0, 0, 0], threshold=0.5)
    assert m.auroc is None and m.auroc_ci is None and m.bootstrap_skipped == 0
    assert m.sensitivity is None and m.sensitivity_ci is None and m.npv == pytest.approx(1.0)
    assert m.specificity == pytest.approx(2 / 3)
    empty = label_metrics("x", [], [], threshold=0.5)
    assert empty.n == 0 and empty.brier is None and empty.ece is None
    json.dumps(m.to_dict(), allow_nan=False)


def test_choose_threshold_hand_examples_and_ties() -> None:
    """The k-th highest positive probability, k = ceil(target x positives); ties count as positive."""
    probs = [0.9, 0.8, 0.6, 0.3, 0.7, 0.2]
    truths = [1, 1, 1, 1, 0, 0]
    assert choose_threshold(probs, truths, sensitivity=1.0) == 0.3
    assert choose_threshold(probs, truths, sensitivity=0.75) == 0.6
    assert choose_threshold(probs, truths, sensitivity=0.7) == 0.6  # 3 of 4 needed
    assert choose_threshold(probs, truths, sensitivity=0.5) == 0.8
    # tie: two positives at 0.6; 0.5 needs 2 of 4 -> 0.6, which reaches 3/4
    assert choose_threshold([0.9, 0.6, 0.6, 0.3, 0.1], [1, 1, 1, 1, 0], sensitivity=0.5) == 0.6
    with pytest.raises(ValueError):
        choose_threshold([0.2, 0.3], [0, 0])
    with pytest.raises(ValueError):
        choose_threshold(probs, truths, sensitivity=0.0)


def test_choose_threshold_matches_brute_force() -> None:
    """On random data with ties the pick is the highest candidate meeting the target."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        probs = np.round(rng.random(25), 1)
        truths = rng.integers(0, 2, 25)
        if truths.sum() == 0:
            continue
        target = float(rng.choice([0.5, 0.8, 0.9, 0.95, 1.0]))
        meeting = [
            t for t in np.unique(probs) if ((probs >= t) & (truths == 1)).sum() / truths.sum() >= target
        ]
        assert choose_threshold(probs, truths, target) == max(meeting)


def make_dicom(path: Path, *, patient_id: str, **attributes: str) -> str:
    """A tiny 8x8 DX image with the given header attributes; returns its SOP Instance UID."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = uid
    ds.PatientID = patient_id
    ds.Modality = "DX"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((8, 8), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return uid


# (sex, age attributes, view, manufacturer, truth, probability)
SUBGROUP_CASES: list[tuple[str | None, dict[str, str], str | None, str, int, float]] = [
    ("F", {"PatientAge": "010W"}, "PA", "Acme", 1, 0.90),
    ("F", {"PatientAge": "003D"}, "AP", "Acme", 0, 0.20),
    ("F", {"PatientAge": "004Y"}, "PA", "Acme", 1, 0.30),
    ("F", {"PatientAge": "018M"}, "PA", "Other", 0, 0.60),
    ("F", {"PatientBirthDate": "19900301", "StudyDate": "20200301"}, "AP", "Other", 1, 0.70),
    ("M", {"PatientAge": "070Y"}, "PA", "Acme", 0, 0.10),
    ("M", {"PatientAge": "017Y"}, "AP", "Acme", 1, 0.80),
    ("M", {"PatientAge": "018Y"}, None, "Acme", 0, 0.40),
    ("M", {"PatientAge": "040Y"}, "PA", "Other", 1, 0.55),
    ("O", {"PatientAge": "065Y"}, "PA", "Acme", 0, 0.35),
    ("O", {}, "AP", "Acme", 0, 0.65),
    (None, {"PatientBirthDate": "20100101", "StudyDate": "20200101"}, "PA", "Acme", 1, 0.95),
]


def test_subgroups_on_a_dicom_dataset(tmp_path: Path) -> None:
    """Group sizes and per-group metrics from real headers (sex, PatientAge, birth date, view, vendor)."""
    rows = []
    probability_by_name = {}
    for i, (sex, ages, view, manufacturer, truth, prob) in enumerate(SUBGROUP_CASES):
        attributes = dict(ages, Manufacturer=manufacturer)
        if sex:
            attributes["PatientSex"] = sex
        if view:
            attributes["ViewPosition"] = view
        make_dicom(tmp_path / f"{i}.dcm", patient_id=f"P{i}", **attributes)
        rows.append([f"{i}.dcm", truth])
        probability_by_name[f"{i}.dcm"] = prob
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "pneumonia"], *rows])
    ds = load_labelled_dataset(tmp_path / "labels.csv")
    cases = [CaseResult.from_case(c, {"pneumonia": probability_by_name[c.path.name]}) for c in ds.cases]
    result = evaluate(cases, ["pneumonia"], {"pneumonia": 0.5}, n_bootstrap=200)

    sizes = {a: {g.group: g.n_cases for g in groups} for a, groups in result.subgroups.items()}
    assert sizes["sex"] == {"F": 5, "M": 4, "O": 2, "unknown": 1}
    assert list(sizes["age_band"].items()) == [
        ("0-1", 2),  # 10 weeks, 3 days
        ("1-5", 2),  # 4 years, 18 months
        ("5-18", 2),  # 17 years; 10 years from birth date
        ("18-40", 2),  # 18 years (lower edge inclusive); 30 years from birth date
        ("40-65", 1),
        ("65+", 2),
        ("unknown", 1),
    ]
    assert sizes["view_position"] == {"AP": 4, "PA": 7, "unknown": 1}
    assert sizes["manufacturer"] == {"Acme": 9, "Other": 3}
    for groups in result.subgroups.values():
        assert sum(g.n_cases for g in groups) == len(SUBGROUP_CASES)

    female = next(g for g in result.subgroups["sex"] if g.group == "F").metrics["pneumonia"]
    f_probs, f_truths = [0.90, 0.20, 0.30, 0.60, 0.70], [1, 0, 1, 0, 1]
    assert female.auroc == pytest.approx(pairwise_auroc(f_probs, f_truths))  # 5 of 6 pairs
    assert (female.tp, female.fp, female.tn, female.fn) == (2, 1, 1, 1)
    other = next(g for g in result.subgroups["sex"] if g.group == "O").metrics["pneumonia"]
    assert other.auroc is None and other.sensitivity is None and other.specificity == pytest.approx(0.5)
    overall = result.overall["pneumonia"]
    assert overall.auroc == pytest.approx(
        pairwise_auroc([c[5] for c in SUBGROUP_CASES], [c[4] for c in SUBGROUP_CASES])
    )
    json.dumps(result.to_dict(), allow_nan=False)


def test_subgroup_helpers() -> None:
    """Band edges are lower-inclusive; sex values outside M/F/O are unknown."""
    assert [age_band(x) for x in (0.0, 0.99, 1.0, 4.9, 5.0, 18.0, 40.0, 64.9, 65.0, 101.0)] == [
        "0-1", "0-1", "1-5", "1-5", "5-18", "18-40", "40-65", "40-65", "65+", "65+",
    ]  # fmt: skip
    assert age_band(None) == "unknown"
    assert [sex_group(s) for s in ("F", "m", "O", "", None, "X")] == [
        "F",
        "M",
        "O",
        "unknown",
        "unknown",
        "unknown",
    ]


def _sixteen_cases() -> list[CaseResult]:
    rng = np.random.default_rng(5)
    cases = []
    for i in range(16):
        truth = i % 2
        prob = float(np.clip(0.3 + 0.4 * truth + rng.normal(0, 0.2), 0, 1))
        cases.append(
            CaseResult(
                probabilities={"pneumonia": prob},
                truths={"pneumonia": truth},
                sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}",
                path=f"val/{i}.dcm",
                patient_sex="MF"[i % 2] if i < 14 else None,
                patient_age=f"{3 + i:03d}Y",
                view_position="PA",
                manufacturer="Acme",
            )
        )
    return cases


def test_report_files_contain_the_key_numbers(tmp_path: Path) -> None:
    """Markdown, HTML, JSON, per-case CSV and PNG plots are written and agree with the result."""
    cases = _sixteen_cases()
    result = evaluate(cases, ["pneumonia"], 0.5, out_dir=tmp_path, n_bootstrap=500)
    assert isinstance(result, EvaluationResult)
    m = result.overall["pneumonia"]
    assert m.auroc is not None and m.auroc_ci is not None and m.sensitivity is not None
    markdown = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    auroc_text = f"{m.auroc:.2f} (95% CI {m.auroc_ci.low:.2f}–{m.auroc_ci.high:.2f})"
    for text in (markdown, page):
        assert "16 images: the confidence intervals are wide" in text
        assert auroc_text in text
        assert f"{m.tp} (true positive)" in text and f"{m.fn} (false negative)" in text
        assert f"{m.sensitivity:.2f}" in text
        assert "Age band (years)" in text and "Patient sex" in text
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert "![ROC curve for pneumonia](roc_pneumonia.png)" in markdown

    for name in ("roc_pneumonia.png", "reliability_pneumonia.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 100

    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert data["overall"]["pneumonia"]["auroc"] == pytest.approx(m.auroc)
    assert data["n_cases"] == 16
    assert [g["group"] for g in data["subgroups"]["sex"]] == ["F", "M", "unknown"]

    with (tmp_path / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "sop_instance_uid", "label", "probability", "truth", "predicted"]
    assert len(rows) == 16
    assert float(rows[3]["probability"]) == pytest.approx(cases[3].probabilities["pneumonia"], abs=1e-6)
    assert rows[3]["truth"] == "1" and rows[3]["sop_instance_uid"] == cases[3].sop_instance_uid


def test_write_report_alone_and_undefined_label(tmp_path: Path) -> None:
    """A label with one class still gets a report saying 'undefined' rather than failing."""
    cases = [
        CaseResult(probabilities={"a": 0.2 * i, "b": 0.1}, truths={"a": i % 2, "b": 0}, path=f"{i}.dcm")
        for i in range(5)
    ]
    result = evaluate(cases, ["a", "b"], {"a": 0.5, "b": 0.5}, n_bootstrap=100)
    files = write_report(result, tmp_path / "out")
    markdown = files.markdown.read_text()
    assert "b: the test set holds only one class, so AUROC is undefined." in markdown
    assert "| AUROC | undefined |" in markdown
    assert files.plots["b"]["roc"].exists()


def test_evaluate_rejects_bad_input() -> None:
    """Missing thresholds, out-of-range probabilities and cases without identity are refused."""
    case = CaseResult(probabilities={"a": 0.5}, truths={"a": 1}, path="x.dcm")
    with pytest.raises(ValueError, match="threshold"):
        evaluate([case], ["a"], {})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate([CaseResult(probabilities={"a": 1.5}, truths={"a": 1}, path="x")], ["a"], 0.5)
    with pytest.raises(ValueError, match="no probability"):
        evaluate([CaseResult(probabilities={}, truths={"a": 1}, path="x")], ["a"], 0.5)
    with pytest.raises(ValueError):
        CaseResult(probabilities={}, truths={})
