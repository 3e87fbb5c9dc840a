"""DICOM -> model input: decode, Modality LUT, VOI LUT/window, photometric, resize, normalise.

``spec`` (what a model card asks for, no decoder), ``frames`` (reading and decoding), ``transforms``
(stored values -> display values) and ``preprocess`` (model input and display image). Everything here
runs in the calling process; untrusted pixel data goes through :class:`dicomnode.sandbox.DecodePool`,
which runs these functions in a child process under a deadline.
"""
