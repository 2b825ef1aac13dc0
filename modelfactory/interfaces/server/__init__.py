"""``modelfactory serve``: the factory's HTTP service (FastAPI).

- ``hooks``  ``POST /hooks/huggingface``: Hugging Face webhook → ``on-finetune`` deployment.
- ``api``    read-only JSON API over the catalog (``/api/runs``, ``/api/runs/{id}``, ``/api/best``).
- ``pages``  HTML pages (leaderboard per base model with a plot).
"""

from modelfactory.interfaces.server.app import create_app

__all__ = ["create_app"]
