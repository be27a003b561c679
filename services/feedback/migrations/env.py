"""Alembic's entry point for the feedback database. Run through services.feedback.store.Store.migrate
(`rlhf feedback migrate`, or the server at start), which hands over an open connection."""
from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from services.feedback.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the feedback migrations with `rlhf feedback migrate --db URL`")

context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        # Replicas starting together would race to create the same tables: one migrates, the
        # others wait here and then find the schema at head. The lock ends with the transaction.
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(7207081)"))
    context.run_migrations()
