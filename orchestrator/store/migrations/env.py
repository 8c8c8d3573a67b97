"""Alembic environment: orch hands in an open connection (see orchestrator.store.store._migrate)."""

from alembic import context

from orchestrator.store.models import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
