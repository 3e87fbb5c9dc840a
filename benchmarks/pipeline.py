"""Whole-worker benchmark: chest studies per second from queued job to SR + key image + KOS on disk.

Makes N single-image chest studies of 2048x2048 16-bit radiographs (the 16 shipped paediatric
images, upscaled to detector size, stored as CR Explicit VR Little Endian, and optionally JPEG 2000),
indexes them as the listener would, and drains the queue with one worker (the real Worker class,
decode pool, default model, report building, durable writes; no destinations). The worker overlaps
the reporting of one batch with the decoding and model of the next, so the per-stage times are
measured while the stages compete for the cores. Prints studies/s,
the time per stage, and the ratio to the model stage alone on the same inputs (the reference
measured in the same run), with the target: >= 10 chest studies/s on 2 CPU cores.

    python benchmarks/pipeline.py [--studies 64] [--syntax uncompressed|j2k] [--batch 16]
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from dicomnode.config import config_from_mapping
from dicomnode.lifecycle.demo import demo_images_dir
from dicomnode.lifecycle.install import install_default_model
from dicomnode.node.services import open_services
from dicomnode.queue.jobs import InstanceRecord
from dicomnode.sandbox import DecodePool
from dicomnode.work.inference import ModelRegistry
from dicomnode.work.pipeline import DECODE_PROCESSES, Worker

CR = "1.2.840.10008.5.1.4.1.1.1"


def radiograph(jpeg: Path, index: int, syntax: str) -> Dataset:
    """A 2048x2048 12-bit-in-16 CR chest radiograph made from a shipped JPEG."""
    with Image.open(jpeg) as image:
        grey = np.asarray(image.convert("L").resize((2048, 2048), Image.BILINEAR), dtype=np.uint16)
    pixels = (grey * 16 + (index % 7)).astype(np.uint16)  # 12-bit range
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = f"Bench^{index}"
    ds.PatientID = f"BENCH{index:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = str(index)
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 2048
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    if syntax == "j2k":
        ds.compress(JPEG2000Lossless)
    return ds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--syntax", choices=["uncompressed", "j2k"], default="uncompressed")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    stages: dict[str, list[float]] = defaultdict(list)

    class StageCollector(logging.Handler):
        pattern = re.compile(r"(route|decode|model|heatmap|report)=([0-9.]+)s")

        def emit(self, record: logging.LogRecord) -> None:
            for name, seconds in self.pattern.findall(record.getMessage()):
                stages[name].append(float(seconds))

    # the one line per job with the stage timings comes from the reporter stage (work/results.py)
    logging.getLogger("dicomnode.work.results").addHandler(StageCollector())
    logging.getLogger("dicomnode.work.results").setLevel(logging.INFO)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        install_default_model(models, pip_install=False, measure=False)
        config = config_from_mapping(
            {
                "storage": {"path": "var", "database_url": "sqlite:///var/db.sqlite"},
                "studies": {"stable_after_seconds": 0},
                "models": {"path": str(models)},
                "destinations": [],
                "worker": {"max_batch_size": args.batch},
            },
            base_dir=root,
        )
        services = open_services(config, upgrade=True)
        store = services.store()
        jpegs = sorted(demo_images_dir().glob("*.jpeg"))
        print(f"making {args.studies} studies of 2048x2048 16-bit CR ({args.syntax}) ...", flush=True)
        templates = [radiograph(jpegs[i % len(jpegs)], i, args.syntax) for i in range(min(16, args.studies))]
        for i in range(args.studies):
            ds = templates[i % len(templates)].copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            from io import BytesIO

            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            path = store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            stored = store.write(path, buffer.getvalue())
            services.queue.record_instance(
                InstanceRecord(
                    ds.SOPInstanceUID,
                    CR,
                    ds.StudyInstanceUID,
                    ds.SeriesInstanceUID,
                    str(ds.file_meta.TransferSyntaxUID),
                    path,
                    stored.size_bytes,
                )
            )

        with DecodePool(workers=DECODE_PROCESSES) as pool:  # as dicomnode worker does
            worker = Worker(config, services, pool=pool)
            # warm up: load the model and the decoder process outside the timed run
            worker.registry.runner("pneumonia-xception")
            pool.read_display_image(store.absolute(path), max_size=64)
            if worker.report_pool is not None:  # and the report process (imports, warm-up build)
                worker.report_pool.ping()
            started = time.perf_counter()
            worker.run(threading.Event(), burst=True)
            elapsed = time.perf_counter() - started
            worker.close()

            # the reference gets torch's default threads (the worker leaves a core to its reporter)
            runner = ModelRegistry(models, max_batch_size=args.batch).runner("pneumonia-xception")
            batch = np.stack(
                [pool.read_model_input(store.absolute(path), runner.card.preprocessing)[0]] * args.batch
            )
            runner.predict(batch)
            model_started = time.perf_counter()
            rounds = max(1, args.studies // args.batch)
            for _ in range(rounds):
                runner.predict(batch)
            model_rate = rounds * args.batch / (time.perf_counter() - model_started)
        services.close()

    rate = args.studies / elapsed
    print(
        f"\nwhole worker: {args.studies} single-image chest studies in {elapsed:.2f} s = {rate:.2f} studies/s"
    )
    print(f"model stage alone (reference, same run, batch {args.batch}): {model_rate:.2f} images/s")
    print(f"ratio whole worker / model stage: {rate / model_rate:.2f}")
    for name in ("route", "decode", "model", "heatmap", "report"):
        if stages[name]:
            print(
                f"  {name:<7} median per job {1000 * statistics.median(stages[name]):7.1f} ms "
                f"(model, heatmap: per batch of up to {args.batch} jobs)"
            )
    print(f"target: >= 10 chest studies/s on 2 CPU cores -> {'met' if rate >= 10 else 'not met'}")


if __name__ == "__main__":
    main()
