-- Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
-- The orch store is POSTGRES_DB (`orch`, created by the image); MLflow gets a database of its own,
-- owned by the same user (POSTGRES_USER, from .env). Both are migrated by their programs on first use.
CREATE DATABASE mlflow;
