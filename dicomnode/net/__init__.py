"""PS3.8 / PS3.7: the DICOM upper layer and DIMSE, with no knowledge of storage or the database."""
