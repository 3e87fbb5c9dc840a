"""dicomnode's one DICOM identity: the Implementation Class UID and Version Name it announces.

The acceptor, the sender, ``dicomnode echo`` and the File Meta Information of every stored file use
these, so a peer's logs and a file's provenance name the same implementation.
"""

from __future__ import annotations

from dicomnode import __version__

# A fixed 2.25 UUID-derived UID (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.153256121207108730629331086459157630654"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
