"""Hugging Face Hub client rules shared by sources (downloads) and publishing (uploads).

- :func:`hub_token`   the token: the Prefect ``Secret`` block named by ``MODELFACTORY_HF_TOKEN_SECRET``,
  else ``HF_TOKEN`` / the saved login (``hf auth login``).
- :func:`hub_errors`  huggingface_hub / httpx / file-system failures → the factory's errors; only
  connection failures, timeouts, 429 and 5xx are transient.

The endpoint is huggingface_hub's own (``HF_ENDPOINT``, read when huggingface_hub is imported).
"""

from modelfactory.hf.auth import hub_token
from modelfactory.hf.errors import HubAccess, hub_errors

__all__ = ["HubAccess", "hub_errors", "hub_token"]
