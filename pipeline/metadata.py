"""The metadata store: every pipeline run, component execution and artifact, in SQLite.

A small ML-Metadata in Python's `sqlite3`, enough for caching and lineage:

    pipeline_runs  id, pipeline_name, pipeline_root, status (running|complete|failed), error,
                   code_version, git_commit, flags, started, finished
    executions     id, run_id, component, parameters (JSON), cache_key,
                   status (running|complete|failed|cached), error, cached_from (the execution whose
                   outputs a cached one reused), started, finished
    artifacts      id, type, uri, fingerprint, properties (JSON), producer_execution_id, created
    events         execution_id, artifact_id, kind (input|output), name

An artifact is produced by exactly one execution; a cached execution gets output events to the
artifacts of the execution it reused, so "what did run 7 use" and "who made this" both have one
answer. An execution left "running" (the process was killed) is simply not reused.
"""

import datetime
import json
import os
import sqlite3

from pipeline.artifacts import Artifact

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pipeline_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pipeline_name TEXT NOT NULL, pipeline_root TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT, code_version TEXT, git_commit TEXT, flags TEXT,
    started TEXT NOT NULL, finished TEXT);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL REFERENCES pipeline_runs(id),
    component TEXT NOT NULL, parameters TEXT NOT NULL, cache_key TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT, cached_from INTEGER REFERENCES executions(id),
    started TEXT NOT NULL, finished TEXT);
CREATE INDEX IF NOT EXISTS executions_by_key ON executions(cache_key, status);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, uri TEXT NOT NULL,
    fingerprint TEXT NOT NULL, properties TEXT NOT NULL,
    producer_execution_id INTEGER REFERENCES executions(id), created TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS artifacts_by_type ON artifacts(type);
CREATE TABLE IF NOT EXISTS events (
    execution_id INTEGER NOT NULL REFERENCES executions(id),
    artifact_id INTEGER NOT NULL REFERENCES artifacts(id),
    kind TEXT NOT NULL CHECK (kind IN ('input', 'output')), name TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_execution ON events(execution_id);
CREATE INDEX IF NOT EXISTS events_by_artifact ON events(artifact_id);
"""
RUN_STATUSES = ("running", "complete", "failed")
EXECUTION_STATUSES = ("running", "complete", "failed", "cached")


class MetadataStoreError(RuntimeError):
    """The metadata database cannot be opened or is not a pipeline metadata store."""


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class MetadataStore:
    """Records and looks up runs, executions and artifacts in the SQLite file at `path`.

    Args:
        path: the database file; created (with its directory) if missing.
        create: create a missing database (False: a missing file is an error, for read-only
            tools such as `pipeline.lineage`).

    Raises:
        MetadataStoreError: the file is not an SQLite database, or one of another schema.

    Example:
        >>> store = MetadataStore("pipelines/smoke/metadata.sqlite")
        >>> run_id = store.start_run("smoke", "pipelines/smoke", code_version="...")
    """

    def __init__(self, path, create=True):
        self.path = path
        if not os.path.exists(path):
            if not create:
                raise MetadataStoreError(f"Metadata store {path} does not exist.")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            self._connection = sqlite3.connect(path)
            self._connection.row_factory = sqlite3.Row
            self._connection.execute("PRAGMA foreign_keys = ON")
            with self._connection:
                self._connection.executescript(_SCHEMA)
                row = self._connection.execute(
                    "SELECT value FROM store_info WHERE key = 'schema_version'").fetchone()
                if row is None:
                    self._connection.execute(
                        "INSERT INTO store_info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif row["value"] != str(SCHEMA_VERSION):
                    raise MetadataStoreError(
                        f"Metadata store {path} has schema version {row['value']}, this code reads "
                        f"version {SCHEMA_VERSION}; use another --metadata_db.")
        except sqlite3.DatabaseError as error:
            raise MetadataStoreError(
                f"Cannot use {path} as the metadata store ({error}): the file is corrupt or not a "
                f"pipeline metadata database. Move it away or pass another --metadata_db."
            ) from None

    def close(self):
        self._connection.close()

    def _write(self, sql, values=()):
        with self._connection:
            return self._connection.execute(sql, values).lastrowid

    def _rows(self, sql, values=()):
        return self._connection.execute(sql, values).fetchall()

    # Runs.
    def start_run(self, pipeline_name, pipeline_root, *, code_version=None, git_commit=None,
                  flags=None):
        """Records a new run as "running"; returns its id."""
        return self._write(
            "INSERT INTO pipeline_runs (pipeline_name, pipeline_root, status, code_version, "
            "git_commit, flags, started) VALUES (?, ?, 'running', ?, ?, ?, ?)",
            (pipeline_name, pipeline_root, code_version, git_commit, flags, utc_now()))

    def finish_run(self, run_id, status, error=None):
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"A run finishes 'complete' or 'failed', not {status!r}.")
        self._write("UPDATE pipeline_runs SET status = ?, error = ?, finished = ? WHERE id = ?",
                    (status, error, utc_now(), run_id))

    def run(self, run_id):
        row = self._rows("SELECT * FROM pipeline_runs WHERE id = ?", (run_id,))
        return dict(row[0]) if row else None

    def runs(self):
        return [dict(row) for row in self._rows("SELECT * FROM pipeline_runs ORDER BY id")]

    # Executions.
    def start_execution(self, run_id, component, parameters, cache_key, inputs):
        """Records a "running" execution and its input events; returns its id."""
        with self._connection:
            execution_id = self._connection.execute(
                "INSERT INTO executions (run_id, component, parameters, cache_key, status, started) "
                "VALUES (?, ?, ?, ?, 'running', ?)",
                (run_id, component, json.dumps(parameters, sort_keys=True, default=str), cache_key,
                 utc_now())).lastrowid
            self._add_events(execution_id, "input", inputs)
        return execution_id

    def complete_execution(self, execution_id, outputs):
        """Records the outputs (`{name: Artifact}` without ids) and marks the execution complete.

        Returns the outputs with their new ids.
        """
        recorded = {}
        with self._connection:
            for name, artifact in outputs.items():
                artifact_id = self._connection.execute(
                    "INSERT INTO artifacts (type, uri, fingerprint, properties, "
                    "producer_execution_id, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (artifact.type_name, artifact.uri, artifact.fingerprint,
                     json.dumps(artifact.properties, sort_keys=True, default=str), execution_id,
                     utc_now())).lastrowid
                recorded[name] = Artifact(artifact.type_name, artifact.uri, artifact.properties,
                                          artifact.fingerprint, artifact_id)
            self._add_events(execution_id, "output", recorded)
            self._connection.execute(
                "UPDATE executions SET status = 'complete', finished = ? WHERE id = ?",
                (utc_now(), execution_id))
        return recorded

    def fail_execution(self, execution_id, error):
        self._write("UPDATE executions SET status = 'failed', error = ?, finished = ? WHERE id = ?",
                    (error, utc_now(), execution_id))

    def record_cached_execution(self, run_id, component, parameters, cache_key, inputs,
                                cached_from, outputs):
        """Records that `run_id` reused the outputs of execution `cached_from`; returns its id."""
        with self._connection:
            now = utc_now()
            execution_id = self._connection.execute(
                "INSERT INTO executions (run_id, component, parameters, cache_key, status, "
                "cached_from, started, finished) VALUES (?, ?, ?, ?, 'cached', ?, ?, ?)",
                (run_id, component, json.dumps(parameters, sort_keys=True, default=str), cache_key,
                 cached_from, now, now)).lastrowid
            self._add_events(execution_id, "input", inputs)
            self._add_events(execution_id, "output", outputs)
        return execution_id

    def _add_events(self, execution_id, kind, artifacts):
        for name, artifact in artifacts.items():
            if artifact.id is None:
                raise ValueError(f"{kind} {name!r} of execution {execution_id} is not recorded.")
            self._connection.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                                     (execution_id, artifact.id, kind, name))

    def find_cached_execution(self, cache_key):
        """The latest completed execution with this cache key, or None."""
        rows = self._rows("SELECT * FROM executions WHERE cache_key = ? AND status = 'complete' "
                          "ORDER BY id DESC LIMIT 1", (cache_key,))
        return self._execution(rows[0]) if rows else None

    def execution(self, execution_id):
        rows = self._rows("SELECT * FROM executions WHERE id = ?", (execution_id,))
        return self._execution(rows[0]) if rows else None

    def executions(self, run_id=None):
        if run_id is None:
            rows = self._rows("SELECT * FROM executions ORDER BY id")
        else:
            rows = self._rows("SELECT * FROM executions WHERE run_id = ? ORDER BY id", (run_id,))
        return [self._execution(row) for row in rows]

    @staticmethod
    def _execution(row):
        execution = dict(row)
        execution["parameters"] = json.loads(execution["parameters"])
        return execution

    def events(self, execution_id, kind):
        """`{name: Artifact}` of the execution's inputs or outputs."""
        rows = self._rows(
            "SELECT events.name AS event_name, artifacts.* FROM events JOIN artifacts ON "
            "artifacts.id = events.artifact_id WHERE events.execution_id = ? AND events.kind = ? "
            "ORDER BY artifacts.id", (execution_id, kind))
        return {row["event_name"]: self._artifact(row) for row in rows}

    # Artifacts.
    @staticmethod
    def _artifact(row):
        return Artifact(row["type"], row["uri"], json.loads(row["properties"]), row["fingerprint"],
                        row["id"])

    def artifact(self, artifact_id):
        rows = self._rows("SELECT * FROM artifacts WHERE id = ?", (artifact_id,))
        return self._artifact(rows[0]) if rows else None

    def artifacts_by_uri(self, uri):
        rows = self._rows("SELECT * FROM artifacts WHERE uri = ? ORDER BY id",
                          (os.path.abspath(uri),))
        return [self._artifact(row) for row in rows]

    def artifacts(self, type_name):
        """Every artifact of a type, oldest first."""
        rows = self._rows("SELECT * FROM artifacts WHERE type = ? ORDER BY id", (type_name,))
        return [self._artifact(row) for row in rows]

    def producer(self, artifact_id):
        """The execution that wrote the artifact (never a cached one), or None."""
        rows = self._rows("SELECT producer_execution_id FROM artifacts WHERE id = ?", (artifact_id,))
        if not rows or rows[0][0] is None:
            return None
        return self.execution(rows[0][0])
