"""Where passing artifacts go: the destination kinds and the URL scheme that names each.

``file:///folder`` (or a plain path) → :mod:`modelfactory.publishing.local`, ``s3://bucket/prefix``
→ :mod:`modelfactory.publishing.s3`, ``hf://owner/repo`` → :mod:`modelfactory.publishing.hub`.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from modelfactory.core.errors import SpecError

#: The destination kinds (``Publication.destination`` in the records and the catalog).
DestinationKind = Literal["file", "s3", "hub"]
SCHEMES: dict[str, DestinationKind] = {"": "file", "file": "file", "s3": "s3", "hf": "hub"}


def destination_kind(url: str) -> DestinationKind:
    """The kind of destination *url* names; :class:`SpecError` for any other scheme."""
    kind = SCHEMES.get(urlparse(url).scheme)
    if kind is None:
        raise SpecError(f"publish destination {url!r} is not supported: use file:///folder (or a local path), "
                        "s3://bucket/prefix or hf://owner/repo")
    return kind
