"""Alembic migrations of the catalog (a package so that ``env.py`` ships with the wheel)."""
