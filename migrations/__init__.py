"""Alembic migrations: the only place the database schema is defined for real."""
