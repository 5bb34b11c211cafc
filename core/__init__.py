"""Steer core: the prefix-tuning engine and the service's domain.

Importable without FastAPI, Celery, SQL or an object store: those live behind
`core.db`, `core.storage` and the thin `api/` and `workers/` packages.
"""
