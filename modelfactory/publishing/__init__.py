"""Publishing destinations for passing artifacts, and reading them back.

- :mod:`~modelfactory.publishing.destinations`  which destination a URL names (``file``, ``s3``, ``hub``).
- :mod:`~modelfactory.publishing.local`  ``file://`` folders; :mod:`~modelfactory.publishing.s3`  ``s3://``
  prefixes; :mod:`~modelfactory.publishing.hub`  ``hf://`` repos (+ :mod:`~modelfactory.publishing.modelcard`).
- :mod:`~modelfactory.publishing.artifacts`  verify or download a published artifact by its URI
  (every file checked against ``manifest.json``).
"""
