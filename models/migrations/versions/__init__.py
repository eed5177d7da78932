"""Alembic revisions, oldest first by their numbered names; alembic skips this file (it is here so setuptools ships
the directory with the package)."""
