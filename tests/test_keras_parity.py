"""Numerical parity of the torch Xception port with Keras itself on the 16 shipped radiographs.

Needs Keras 3 with its torch backend (``pip install keras`` in a test environment); skipped where
Keras is not installed. Keras is never a runtime dependency of dicomnode.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.errors import ModelUnavailableError
from dicomnode.lifecycle.install import (
    install_default_model,
    keras_archive,
    keras_style_input,
    source_package_dir,
    validation_images,
)
from dicomnode.models import load_model_package
from dicomnode.models.runner import ModelRunner

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="Keras 3 is only installed in the parity-test environment")

PARITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def package_dir() -> Path:
    try:
        return source_package_dir(pip_install=False)
    except ModelUnavailableError:
        pytest.skip("pneumonia_model_package==0.3.0 is not installed")


def test_torch_port_matches_keras(tmp_path_factory: pytest.TempPathFactory, package_dir: Path) -> None:
    """Keras' own loader and input pipeline vs. the converted torch model: probabilities agree < 1e-4."""
    images = validation_images(package_dir)
    model = keras.saving.load_model(keras_archive(package_dir), compile=False)
    keras_inputs = np.stack(
        [
            keras.applications.xception.preprocess_input(
                keras.utils.img_to_array(
                    keras.utils.load_img(image.path, target_size=(150, 150), interpolation="nearest")
                )
            )
            for image in images
        ]
    ).astype(np.float32)
    torch_inputs = np.stack([keras_style_input(image.path) for image in images])
    # dicomnode's PIL preprocessing is the Keras pipeline, bit for bit
    np.testing.assert_array_equal(torch_inputs, keras_inputs.transpose(0, 3, 1, 2))

    logits = np.asarray(keras.ops.convert_to_numpy(model(keras_inputs, training=False)), dtype=np.float32)
    keras_probs = torch.softmax(torch.from_numpy(logits), dim=1)[:, 1].numpy()

    runner = ModelRunner(
        load_model_package(install_default_model(tmp_path_factory.mktemp("models"), pip_install=False)),
        device="cpu",
    )
    torch_probs = runner.predict(torch_inputs)[:, 0]
    difference = float(np.max(np.abs(torch_probs - keras_probs)))
    print(f"Keras {keras.__version__} vs torch port, 16 images: max |p_keras - p_torch| = {difference:.3g}")
    assert difference < PARITY_TOLERANCE
    assert np.array_equal(keras_probs >= 0.5, torch_probs >= 0.5)
