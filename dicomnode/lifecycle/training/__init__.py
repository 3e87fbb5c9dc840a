"""``dicomnode train``: fine-tune a model package (or train one from scratch) on a labelled DICOM dataset.

The inputs are made by :func:`dicomnode.imaging.decode_model_input`, the production preprocessing, with
the card's :class:`~dicomnode.imaging.PreprocessSpec`, so what the network learns from is what the node
will feed it. Decoded tensors are cached in memory for the run; augmentation (small affine, brightness,
contrast; no left-right flip unless asked) runs on those tensors with torch. Training uses AdamW, class
weighting, early stopping on the validation AUROC and a checkpoint after every epoch (a re-run resumes
from it). The result is a complete model package (``weights.pt`` + ``model.toml`` + ``training.json``)
that :func:`dicomnode.models.load_model_package` loads unchanged, with test-split metrics from
:func:`dicomnode.lifecycle.evaluation.evaluate` in its card. Patient IDs are used only to split by
patient; they never reach logs, checkpoints or the package.
"""
