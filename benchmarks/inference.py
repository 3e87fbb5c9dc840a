"""Inference benchmark, model stage: images per second of :class:`ModelRunner.predict`.

* the default model (Xception, 150x150x3, converted from pneumonia_model_package) on CPU at batch 1
  and 16, fed the 16 shipped radiographs (Keras-style preprocessing, done before timing);
* DenseNet-121 at 224x224x1 on CUDA (channels-last, bf16/fp16 autocast) at batch 1, 16 and 64 when a
  GPU is present (``--densenet-cpu`` also times it on CPU). Its weights are random: the package is
  made in a temporary folder for timing only and never reports findings.

The full-pipeline part (DICOM decode -> SR) is added separately. Compare ratios within one run, not
absolute numbers across machines.

    python benchmarks/inference.py [--seconds 3] [--models-dir DIR] [--densenet-cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dicomnode.lifecycle.install import (
    install_default_model,
    keras_style_input,
    source_package_dir,
    validation_images,
)
from dicomnode.models import load_model_package
from dicomnode.models.densenet import build_densenet121
from dicomnode.models.runner import ModelRunner

DENSENET_CARD = """
name = "benchmark-densenet121"
version = "random-weights"
architecture = "densenet121"
weights = "weights.pt"
output_activation = "sigmoid"
[architecture_parameters]
num_classes = 18
in_channels = 1
[[labels]]
name = "pneumonia"
code = "SCT:233604007"
code_meaning = "Pneumonia"
output_index = 0
[preprocessing]
size = [224, 224]
channels = 1
scale = 2048.0
offset = -1024.0
"""


def images_per_second(runner: ModelRunner, batch: np.ndarray, seconds: float) -> float:
    """Run ``predict`` repeatedly for about ``seconds`` (after one warm-up call); images per second."""
    runner.predict(batch)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    count = 0
    started = time.perf_counter()
    while True:
        runner.predict(batch)  # returns numpy: already synchronised with the device
        count += batch.shape[0]
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return count / elapsed


def _tile(inputs: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([inputs] * (n // inputs.shape[0] + 1))[:n]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--models-dir", type=Path, help="where the default model is (installed if absent)")
    parser.add_argument("--densenet-cpu", action="store_true", help="also time DenseNet-121 on CPU")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {cuda}")
    with tempfile.TemporaryDirectory() as temp:
        models_dir = args.models_dir or Path(temp)
        package = load_model_package(install_default_model(models_dir, pip_install=False, measure=False))
        images = validation_images(source_package_dir())
        inputs = np.stack([keras_style_input(image.path) for image in images])
        runner = ModelRunner(package, device="cpu", max_batch_size=16)
        for batch_size in (1, 16):
            rate = images_per_second(runner, _tile(inputs, batch_size), args.seconds)
            print(f"xception 150x150x3  cpu   batch {batch_size:3d}: {rate:8.1f} images/s")

        devices = (["cpu"] if args.densenet_cpu else []) + (["cuda"] if cuda else [])
        if devices:
            folder = Path(temp) / "densenet"
            folder.mkdir()
            (folder / "model.toml").write_text(DENSENET_CARD, encoding="utf-8")
            torch.save(build_densenet121(18, 1).state_dict(), folder / "weights.pt")
            dense = load_model_package(folder)
            rng = np.random.default_rng(0)
            for device in devices:
                dense_runner = ModelRunner(dense, device=device, max_batch_size=64)
                for batch_size in (1, 16, 64):
                    batch = rng.uniform(-1024, 1024, size=(batch_size, 1, 224, 224)).astype(np.float32)
                    rate = images_per_second(dense_runner, batch, args.seconds)
                    print(
                        f"densenet121 224x224 {device:5s} batch {batch_size:3d}: {rate:8.1f} images/s "
                        f"(autocast {dense_runner.autocast_dtype})"
                    )


if __name__ == "__main__":
    main()
