"""Reporting: findings -> DICOM objects for the PACS (TID 1500 SR, Secondary Capture key image, KOS).

No torch here; inputs are :class:`dicomnode.findings.StudyFindings`, pydicom datasets and arrays.
Import what you need from the modules (``sr``, ``key_image``, ``key_object``, ``bundle``, ``uids``):
this package imports nothing eagerly, so reading an SR's UIDs does not load matplotlib.
"""
