"""dicomnode: a DICOM AI node for radiology departments."""

__version__ = "0.1.0"
