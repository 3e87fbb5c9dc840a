"""Model packages, cards, the Xception port of the default model, DenseNet-121, the runner, Grad-CAM.

Everything runs on real weights and images: the default model is converted from the installed
``pneumonia_model_package`` (no network); DenseNet and TorchScript packages are made by the tests.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.findings import findings_for
from dicomnode.lifecycle.install import (
    ValidationImage,
    install_default_model,
    keras_style_input,
    source_package_dir,
    validation_images,
)
from dicomnode.models import DEFAULT_MODEL_NAME, ModelPackage, discover_models, load_model_package
from dicomnode.models.card import ModelCard, device_observer_uid
from dicomnode.models.densenet import build_densenet121
from dicomnode.models.gradcam import grad_cam, grad_cam_batch, grad_cam_from_features, grad_cam_map
from dicomnode.models.runner import ModelRunner
from dicomnode.models.xception import SameMaxPool2d, same_padding

MINIMAL_CARD = """
name = "toy"
version = "1.0"
task = "image-classification"
architecture = "densenet121"
weights = "weights.pt"
output_activation = "sigmoid"

[architecture_parameters]
num_classes = 3
in_channels = 1
key_layout = "{layout}"

[[labels]]
name = "effusion"
display_name = "Pleural effusion"
code = "SCT:60046008"
code_meaning = "Pleural effusion"
threshold = 0.4
output_index = 2

[[labels]]
name = "pneumothorax"
code = "SCT:36118008"
code_meaning = "Pneumothorax"
output_index = 0

[preprocessing]
size = [64, 64]
channels = 1
interpolation = "area"
scale = 2048.0
offset = -1024.0
"""


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package_dir() -> Path:
    try:
        return source_package_dir(pip_install=False)
    except ModelUnavailableError:
        pytest.skip("pneumonia_model_package==0.3.0 is not installed")


@pytest.fixture(scope="module")
def default_package(tmp_path_factory: pytest.TempPathFactory, package_dir: Path) -> ModelPackage:
    folder = install_default_model(tmp_path_factory.mktemp("models"), pip_install=False)
    return load_model_package(folder)


@pytest.fixture(scope="module")
def default_runner(default_package: ModelPackage) -> ModelRunner:
    return ModelRunner(default_package, device="cpu", max_batch_size=16)


@pytest.fixture(scope="module")
def shipped(package_dir: Path) -> tuple[list[ValidationImage], np.ndarray]:
    images = validation_images(package_dir)
    return images, np.stack([keras_style_input(image.path) for image in images])


def _write_package(folder: Path, card_text: str, weights: object | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(card_text, encoding="utf-8")
    if isinstance(weights, torch.jit.ScriptModule):
        weights.save(str(folder / "weights.pt"))
    elif weights is not None:
        torch.save(weights, folder / "weights.pt")
    return folder


def _monai_to_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the mapping under test: MONAI names -> torchvision/TorchXRayVision names."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"(denselayer\d+)\.layers\.", r"\1.", key)
        key = key.replace("class_layers.out.", "classifier.")
        renamed[key] = value
    return renamed


# --- model cards ----------------------------------------------------------------------------------


def test_card_parses_every_section() -> None:
    """A complete card becomes a ModelCard with coded labels and a PreprocessSpec."""
    card = ModelCard.from_toml(MINIMAL_CARD.format(layout="monai"))
    assert card.labels[0].concept.compact == "SCT:60046008"
    assert card.labels[1].display_name == "pneumothorax"  # defaults to the name
    assert card.preprocessing.size == (64, 64) and card.preprocessing.scale == 2048.0
    assert card.num_classes == 3 and card.in_channels == 1
    assert card.not_for_clinical_use is True  # the safe default
    assert card.identity.device_observer_uid == card.device_observer_uid


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('code = "SCT:60046008"', 'code = "60046008"', "labels[0].code"),
        ("output_index = 2", "output_index = 3", "labels[0].output_index"),
        ("threshold = 0.4", "threshold = 1.4", "labels[0].threshold"),
        ('weights = "weights.pt"\n', "", "weights"),
        ('architecture = "densenet121"', 'architecture = "resnet"', "architecture"),
        ("size = [64, 64]", "size = [64]", "preprocessing.size"),
        ("channels = 1\n", "channels = 3\n", "preprocessing.channels"),
        ('key_layout = "monai"', 'key_layout = "keras"', "architecture_parameters.key_layout"),
        ("in_channels = 1", "in_chanels = 1", "architecture_parameters.in_chanels"),
        ('weights = "weights.pt"', 'weights = "../weights.pt"', "weights"),
        (
            "offset = -1024.0",
            "offset = -1024.0\nreduced_decode_margin = 0.5",
            "preprocessing.reduced_decode_margin",
        ),
        ('output_activation = "sigmoid"', 'output_activation = "softmax"\nthreshold = 1', "threshold"),
    ],
)
def test_card_errors_name_the_key(old: str, new: str, key: str) -> None:
    """Each invalid card raises ConfigurationError whose key points at the offending entry."""
    text = MINIMAL_CARD.format(layout="monai")
    assert old in text
    with pytest.raises(ConfigurationError) as info:
        ModelCard.from_toml(text.replace(old, new, 1))
    assert info.value.key == key


def test_device_observer_uid_is_stable_per_name_and_version() -> None:
    """The Device Observer UID is a valid 2.25 UID, the same every time, and new for a new version."""
    uid = device_observer_uid("pneumonia-xception", "0.3.0")
    assert uid == device_observer_uid("pneumonia-xception", "0.3.0")
    assert uid != device_observer_uid("pneumonia-xception", "0.3.1")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64


def test_package_without_weights_refuses_to_load(tmp_path: Path) -> None:
    """A card without its weights file is unavailable, never run with random weights."""
    folder = _write_package(tmp_path / "toy", MINIMAL_CARD.format(layout="monai"), None)
    with pytest.raises(ModelUnavailableError):
        load_model_package(folder)
    with pytest.raises(ModelUnavailableError):
        load_model_package(tmp_path / "missing")
    assert discover_models(tmp_path) == []
    with pytest.raises(ModelUnavailableError):
        discover_models(tmp_path, strict=True)


def test_discover_models_skips_broken_packages(tmp_path: Path) -> None:
    """discover_models returns the valid packages and skips (or, strict, raises on) an invalid card."""
    net = build_densenet121(3, 1)
    _write_package(tmp_path / "good", MINIMAL_CARD.format(layout="monai"), net.state_dict())
    _write_package(tmp_path / "bad", MINIMAL_CARD.format(layout="nope"), net.state_dict())
    (tmp_path / "not-a-model").mkdir()
    found = discover_models(tmp_path)
    assert [p.card.name for p in found] == ["toy"]
    with pytest.raises(ConfigurationError):
        discover_models(tmp_path, strict=True)


# --- the default model (Keras Xception converted to torch) -----------------------------------------


def test_keras_same_padding_is_asymmetric() -> None:
    """Stride-2 3x3 'same' pooling pads only after on even sizes, both sides on odd ones (as Keras)."""
    assert same_padding(72, 3, 2) == (0, 1)
    assert same_padding(9, 3, 2) == (1, 1)
    assert same_padding(150, 1, 2) == (0, 0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = SameMaxPool2d()(x)
    # windows start at rows/cols 0 and 2 (no padding before): maxima at (2,2), (2,3), (3,2), (3,3)
    assert pooled.flatten().tolist() == [10.0, 11.0, 14.0, 15.0]


def test_default_model_installs_with_a_truthful_card(default_package: ModelPackage) -> None:
    """The converted package has weights, one SCT-coded label on output 1, and says it is not clinical."""
    card = default_package.card
    assert card.name == DEFAULT_MODEL_NAME and card.version == "0.3.0"
    assert default_package.weights_path.stat().st_size > 80_000_000
    (label,) = card.labels
    assert (label.name, label.concept.compact, label.output_index, label.threshold) == (
        "pneumonia",
        "SCT:233604007",
        1,
        0.5,
    )
    assert card.output_activation == "softmax"
    spec = card.preprocessing
    assert (spec.size, spec.channels, spec.interpolation, spec.scale, spec.offset, spec.quantize_8bit) == (
        (150, 150),
        3,
        "nearest",
        2.0,
        -1.0,
        True,
    )
    assert card.not_for_clinical_use
    assert "Kermany" in card.training_data and "Guangzhou" in card.training_data
    assert "No licence" in card.licence
    assert (
        "measured by dicomnode" in card.performance.summary.lower()
        or "Measured by dicomnode" in card.performance.summary
    )
    assert {m.value for m in card.performance.measurements} >= {0.861}


def test_install_is_idempotent(default_package: ModelPackage) -> None:
    """A second install keeps the existing package instead of converting again."""
    before = default_package.weights_path.stat().st_mtime_ns
    started = time.perf_counter()
    install_default_model(default_package.path.parent, pip_install=False)
    assert time.perf_counter() - started < 2.0
    assert default_package.weights_path.stat().st_mtime_ns == before


def test_default_model_classifies_the_shipped_radiographs(
    default_runner: ModelRunner, shipped: tuple[list[ValidationImage], np.ndarray]
) -> None:
    """On the 16 shipped JPEGs (Keras-style preprocessing) the port scores 13/16, as Keras does."""
    images, batch = shipped
    probs = default_runner.predict(batch)
    assert probs.shape == (16, 1) and probs.dtype == np.float32
    decisions = [findings_for(row, default_runner.card)[0].present for row in probs]
    truth = [image.pneumonia for image in images]
    correct = sum(d == t for d, t in zip(decisions, truth, strict=True))
    print(f"default model accuracy on the 16 shipped images: {correct}/16; p = {np.round(probs[:, 0], 4)}")
    assert sum(truth) == 8
    assert correct == 13  # measured: 7/8 normal, 6/8 pneumonia; identical decisions in Keras


def test_predict_splits_into_chunks(
    default_package: ModelPackage,
    default_runner: ModelRunner,
    shipped: tuple[list[ValidationImage], np.ndarray],
) -> None:
    """Any N is accepted; chunking by max_batch_size does not change the probabilities."""
    _, batch = shipped
    small = ModelRunner(default_package, device="cpu", max_batch_size=3)
    np.testing.assert_allclose(small.predict(batch[:7]), default_runner.predict(batch[:7]), atol=1e-5)
    assert default_runner.predict(batch[:0]).shape == (0, 1)
    with pytest.raises(ValueError, match="expected input"):
        default_runner.predict(batch[:, :1])
    with pytest.raises(ValueError, match="predict"):
        default_runner.predict_volume(batch)


def test_findings_apply_the_threshold(default_package: ModelPackage) -> None:
    """findings_for turns probabilities into coded findings; present means p >= threshold."""
    card = default_package.card
    (finding,) = findings_for(np.array([0.5]), card)
    assert finding.present and finding.concept.value == "233604007" and finding.threshold == 0.5
    assert not findings_for([0.4999], card)[0].present
    assert findings_for([1.0000001], card)[0].probability == 1.0
    with pytest.raises(ValueError):
        findings_for([0.1, 0.2], card)


def test_grad_cam_on_a_pneumonia_radiograph(
    default_runner: ModelRunner, shipped: tuple[list[ValidationImage], np.ndarray]
) -> None:
    """Grad-CAM gives a finite float32 map in [0, 1] of the requested shape, even inside inference_mode."""
    images, batch = shipped
    index = next(i for i, image in enumerate(images) if image.pneumonia)
    with torch.inference_mode():
        heat = grad_cam(default_runner, batch[index], 0, (480, 360))
    assert heat.shape == (480, 360) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)


def test_frozen_graph_matches_the_eager_network(
    default_runner: ModelRunner, shipped: tuple[list[ValidationImage], np.ndarray]
) -> None:
    """The runner's frozen CPU graph gives the eager float32 network's probabilities within 1e-5."""
    _, batch = shipped
    assert default_runner._graph() is not None  # the fast path is the one under test
    network = default_runner.network.to(memory_format=torch.contiguous_format)
    try:
        with torch.inference_mode():
            logits = network(torch.from_numpy(batch))
        expected = torch.softmax(logits.float(), dim=1)[:, [1]].numpy()
    finally:
        default_runner.network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    np.testing.assert_allclose(default_runner.predict(batch), expected, atol=1e-5, rtol=0)


def test_grad_cam_from_kept_activations_matches_a_second_pass(
    default_runner: ModelRunner, shipped: tuple[list[ValidationImage], np.ndarray]
) -> None:
    """Grad-CAM from the prediction's kept activations equals Grad-CAM with its own forward pass."""
    _, batch = shipped
    probabilities, features = default_runner.predict_with_features(batch)
    np.testing.assert_array_equal(probabilities, default_runner.predict(batch))
    assert features is not None and len(features) == len(batch)
    rows = [0, 5, 9, 12]
    kept = grad_cam_from_features(default_runner, [features[i] for i in rows], [0] * 4, [(120, 100)] * 4)
    again = grad_cam_batch(default_runner, batch[rows], [0] * 4, [(120, 100)] * 4)
    for new, old in zip(kept, again, strict=True):
        assert new.shape == (120, 100) and new.dtype == np.float32
        np.testing.assert_allclose(new, old, atol=2e-3)


def test_cpu_threads_apply_while_predicting_only(
    default_package: ModelPackage, shipped: tuple[list[ValidationImage], np.ndarray]
) -> None:
    """A runner's cpu_threads hold during its prediction and torch's own setting afterwards."""
    before = torch.get_num_threads()
    runner = ModelRunner(default_package, device="cpu", cpu_threads=1)
    seen: list[int] = []
    handle = runner.network.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    runner._frozen = None  # run eagerly so that the hook sees the forward pass
    try:
        runner.predict(shipped[1][:2])
    finally:
        handle.remove()
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError):
        ModelRunner(default_package, device="cpu", cpu_threads=0)


def test_grad_cam_peaks_where_the_evidence_is() -> None:
    """On a model that scores bright pixels, the heat map's maximum lies on the bright square."""

    class Bright(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
            self.act = nn.ReLU()
            self.out = nn.Linear(4, 2)
            with torch.no_grad():
                self.conv.weight.fill_(1.0 / 9)
                self.out.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
                self.out.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.conv(x) - 0.2).mean(dim=(2, 3)))

    image = torch.zeros(1, 32, 32)
    image[0, 20:28, 4:12] = 1.0
    model = Bright().eval()
    heat = grad_cam_map(model, model.act, image, lambda z: z[:, 1] - z[:, 0], (64, 64))
    row, col = np.unravel_index(int(heat.argmax()), heat.shape)
    assert 40 <= row < 56 and 8 <= col < 24  # the square, at twice the resolution
    assert heat[:30].max() == 0.0  # nothing where the image is empty


# --- DenseNet-121 and TorchScript packages ----------------------------------------------------------


@pytest.mark.parametrize("layout", ["monai", "torchxrayvision"])
def test_densenet_package_loads_monai_and_torchxrayvision_keys(tmp_path: Path, layout: str) -> None:
    """A DenseNet-121 state dict in MONAI or TorchXRayVision/torchvision key layout gives the same outputs."""
    torch.manual_seed(0)
    reference = build_densenet121(num_classes=3, in_channels=1).eval()
    state = reference.state_dict()
    if layout != "monai":
        state = _monai_to_torchvision_keys(state)
        assert "features.denseblock1.denselayer1.conv1.weight" in state and "classifier.weight" in state
    folder = _write_package(tmp_path / "toy", MINIMAL_CARD.format(layout=layout), state)
    runner = ModelRunner(load_model_package(folder), device="cpu")
    x = np.random.default_rng(0).uniform(-1024, 1024, size=(2, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = torch.sigmoid(reference(torch.from_numpy(x)))[:, [2, 0]].numpy()
    np.testing.assert_allclose(runner.predict(x), expected, atol=1e-5)
    heat = grad_cam(runner, x[0], 1, (100, 80))
    assert heat.shape == (100, 80) and np.isfinite(heat).all()


def test_densenet_with_foreign_weights_is_unavailable(tmp_path: Path) -> None:
    """Weights that do not fit the declared architecture refuse to load instead of running half-filled."""
    state = build_densenet121(num_classes=5, in_channels=1).state_dict()
    folder = _write_package(tmp_path / "toy", MINIMAL_CARD.format(layout="monai"), state)
    with pytest.raises(ModelUnavailableError):
        ModelRunner(load_model_package(folder), device="cpu")


VOLUME_CARD = """
name = "toy-volume"
version = "1"
task = "series-classification"
architecture = "torchscript"
weights = "weights.pt"
output_activation = "softmax"

[architecture_parameters]
num_classes = 2
in_channels = 1

[[labels]]
name = "finding"
code = "SCT:404684003"
code_meaning = "Clinical finding"
output_index = 1

[preprocessing]
size = [16, 16]
channels = 1
frames = "all"
"""


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_series_model_predicts_a_volume(tmp_path: Path) -> None:
    """A scripted 3-D model packaged with its own card classifies an (N_slices, C, H, W) volume."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    scripted = torch.jit.script(net.eval())
    folder = _write_package(tmp_path / "vol", VOLUME_CARD, scripted)
    runner = ModelRunner(load_model_package(folder), device="cpu")
    volume = np.random.default_rng(1).normal(size=(7, 1, 16, 16)).astype(np.float32)
    probs = runner.predict_volume(volume)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(volume).permute(1, 0, 2, 3)[None]), dim=1)[0, 1]
    assert probs.shape == (1,) and probs[0] == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="predict_volume"):
        runner.predict(volume)
    with pytest.raises(ValueError, match="Grad-CAM"):
        grad_cam(runner, volume[0], 0, (16, 16))


# --- GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_cpu(
    default_package: ModelPackage,
    default_runner: ModelRunner,
    shipped: tuple[list[ValidationImage], np.ndarray],
) -> None:
    """On CUDA (channels-last, bf16/fp16 autocast) probabilities stay within 0.02 of float32 CPU."""
    _, batch = shipped
    gpu = ModelRunner(default_package)
    assert gpu.device.type == "cuda" and gpu.autocast_dtype in (torch.bfloat16, torch.float16)
    np.testing.assert_allclose(gpu.predict(batch), default_runner.predict(batch), atol=0.02)
    heat = grad_cam(gpu, batch[8], 0, (150, 150))
    assert np.isfinite(heat).all()
