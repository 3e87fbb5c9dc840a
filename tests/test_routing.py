"""Routing rules on real DICOM headers: which model runs on which image, and why not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from corpus import find
from factories import ct_like
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from test_cli import write_config

from dicomnode.cli import main
from dicomnode.config import RouteConfig, config_from_mapping
from dicomnode.work.routing import route_image


def header(name: str) -> Dataset:
    return pydicom.dcmread(find(name), stop_before_pixels=True)


def routes(*items: dict[str, Any]) -> tuple[RouteConfig, ...]:
    return config_from_mapping({"routes": list(items)}, base_dir=Path.cwd()).routes


@pytest.fixture(scope="module")
def default_routes() -> tuple[RouteConfig, ...]:
    return config_from_mapping({}, base_dir=Path.cwd()).routes


def test_default_route_sends_a_chest_pa_radiograph_to_the_pneumonia_model(
    default_routes: tuple[RouteConfig, ...],
) -> None:
    """RG1_UNCR (CR, CHEST, PA) goes to pneumonia-xception by the chest-radiograph route."""
    decision = route_image(default_routes, header("RG1_UNCR.dcm"))
    assert (decision.route, decision.model) == ("chest-radiograph", "pneumonia-xception")
    assert "chest-radiograph" in decision.reason


@pytest.mark.parametrize(
    "name,attribute",
    [
        ("RG3_UNCR.dcm", "BodyPartExamined EXTREMITY"),
        ("CT_small.dcm", "Modality CT"),
        ("MR_small.dcm", "Modality MR"),
    ],
)
def test_default_routes_give_other_images_no_model_and_say_why(
    default_routes: tuple[RouteConfig, ...], name: str, attribute: str
) -> None:
    """An extremity radiograph, a CT and an MR get no model; the reason names the failing attribute."""
    decision = route_image(default_routes, header(name))
    assert (decision.route, decision.model) == (None, None)
    assert "chest-radiograph" in decision.reason
    assert attribute in decision.reason


def test_no_routes_configured() -> None:
    """With no routes nothing runs, and the reason says so."""
    decision = route_image((), header("RG1_UNCR.dcm"))
    assert decision.model is None
    assert "no routes" in decision.reason


def test_first_matching_route_wins_and_misses_are_listed() -> None:
    """Routes are tried in order; every miss is in the reason when none matches."""
    table = routes(
        {"name": "ct", "model": "ct-model", "modality": "CT"},
        {"name": "any", "model": "catch-all"},
    )
    assert route_image(table, header("CT_small.dcm")).model == "ct-model"
    assert route_image(table, header("MR_small.dcm")).model == "catch-all"
    only_ct = routes(
        {"name": "ct", "model": "ct-model", "modality": "CT"}, {"name": "us", "model": "u", "modality": "US"}
    )
    reason = route_image(only_ct, header("MR_small.dcm")).reason
    assert "ct: Modality MR" in reason and "us: Modality MR" in reason


def test_series_description_regex_is_case_insensitive_search() -> None:
    """series_description is a regular expression searched anywhere, ignoring case."""
    table = routes({"name": "lung", "model": "lung-model", "series_description": r"lung|thorax\b"})
    ds = ct_like(generate_uid(), generate_uid(), 0)
    ds.SeriesDescription = "CT Thorax 1.0 mm"
    assert route_image(table, ds).model == "lung-model"
    ds.SeriesDescription = "LUNG window"
    assert route_image(table, ds).model == "lung-model"
    ds.SeriesDescription = "Thoraxes"
    decision = route_image(table, ds)
    assert decision.model is None
    assert "SeriesDescription does not match" in decision.reason
    del ds.SeriesDescription
    assert route_image(table, ds).model is None


def test_calling_ae_title_match() -> None:
    """calling_ae_title restricts a route to images sent by given modalities."""
    table = routes({"name": "from-ct1", "model": "m", "calling_ae_title": ["CT1", "CT2"]})
    ds = ct_like(generate_uid(), generate_uid(), 0)
    assert route_image(table, ds, "CT2").model == "m"
    assert route_image(table, ds, "ct1 ").model == "m"  # AE titles compare trimmed, ignoring case
    miss = route_image(table, ds, "MR1")
    assert miss.model is None and "calling AE title MR1" in miss.reason
    absent = route_image(table, ds, None)
    assert absent.model is None and "calling AE title is absent" in absent.reason


def test_empty_string_means_absent() -> None:
    """An empty string in a list accepts an image that lacks the attribute, alongside the listed values."""
    table = routes({"name": "r", "model": "m", "modality": "CT", "body_part_examined": ["chest", ""]})
    ds = ct_like(generate_uid(), generate_uid(), 0)
    assert "BodyPartExamined" not in ds
    assert route_image(table, ds).model == "m"
    ds.BodyPartExamined = "CHEST"
    assert route_image(table, ds).model == "m"  # values compare ignoring case
    ds.BodyPartExamined = "HEAD"
    decision = route_image(table, ds)
    assert decision.model is None and "BodyPartExamined HEAD" in decision.reason
    strict = routes({"name": "r", "model": "m", "body_part_examined": ["CHEST"]})
    del ds.BodyPartExamined
    assert "BodyPartExamined is absent" in route_image(strict, ds).reason


def test_image_type_needs_all_listed_values() -> None:
    """image_type matches only when every listed value is in ImageType."""
    table = routes({"name": "r", "model": "m", "image_type": ["ORIGINAL", "PRIMARY"]})
    assert route_image(table, header("RG3_UNCR.dcm")).model == "m"  # ORIGINAL\PRIMARY
    assert route_image(table, header("CT_small.dcm")).model == "m"  # ORIGINAL\PRIMARY\AXIAL
    derived = route_image(table, header("RG1_UNCR.dcm"))  # DERIVED\PRIMARY
    assert derived.model is None and "ImageType lacks ORIGINAL" in derived.reason
    secondary = route_image(table, header("MR_small.dcm"))  # DERIVED\SECONDARY\OTHER
    assert "ImageType lacks ORIGINAL/PRIMARY" in secondary.reason


def test_rules_test_command_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rules test FILE... --json`: route, model and reason per file; a not-DICOM file is an error."""
    path = write_config(tmp_path)
    assert "[[routes]]" not in path.read_text(encoding="utf-8")  # the default routes apply
    files = [str(find(name)) for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "CT_small.dcm")]
    junk = tmp_path / "not-dicom.dcm"
    junk.write_bytes(b"hello")
    capsys.readouterr()
    assert main(["--config", str(path), "rules", "test", *files, str(junk), "--json"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == [*files, str(junk)]
    assert [r["model"] for r in results] == ["pneumonia-xception", None, None, None]
    assert results[0]["route"] == "chest-radiograph"
    assert "BodyPartExamined EXTREMITY" in results[1]["reason"]
    assert "Modality CT" in results[2]["reason"]
    assert "not a DICOM file" in results[3]["error"] and results[0]["error"] is None
    assert main(["--config", str(path), "rules", "test", files[0]]) == 0
    assert "pneumonia-xception" in capsys.readouterr().out


def test_rules_test_uses_calling_ae(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--calling-ae feeds the calling AE title to routes that match on it."""
    path = write_config(
        tmp_path, routes=[{"name": "ct1", "model": "ct-model", "modality": "CT", "calling_ae_title": "CT1"}]
    )
    ct = str(find("CT_small.dcm"))
    capsys.readouterr()
    assert main(["--config", str(path), "rules", "test", ct, "--json", "--calling-ae", "CT1"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["model"] == "ct-model"
    assert main(["--config", str(path), "rules", "test", ct, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["model"] is None
