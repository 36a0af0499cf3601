"""The schema, changed only through numbered migrations (sqlite-utils' Migrations).

Each migration runs in a transaction with the record of it having run, so a process that starts
while another is migrating either sees the old schema or the new one, never half of it. Add a
change as a new function at the end; never edit one that has shipped.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("selfcog")


@migrations()
def m001_initial(db: Database) -> None:
    db["users"].create(
        {"id": int, "channel": str, "external_id": str, "display_name": str, "role": str, "created_at": str},
        pk="id",
        not_null={"channel", "external_id", "role", "created_at"},
        defaults={"role": "user"},
    )
    db["users"].create_index(["channel", "external_id"], unique=True)

    db["conversations"].create(
        {"id": int, "user_id": int, "channel": str, "chat_key": str, "created_at": str, "updated_at": str},
        pk="id",
        foreign_keys=[("user_id", "users", "id")],
        not_null={"channel", "created_at"},
    )
    db["conversations"].create_index(["channel", "chat_key"])

    db["messages"].create(
        {
            "id": int,
            "conversation_id": int,
            "role": str,  # user | assistant
            "text": str,
            "adapter_version": int,  # which adapter answered (assistant rows); NULL = base model
            "latency_ms": int,  # request -> last token
            "first_token_ms": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "identity_question": int,  # user rows: 1 when it asks about the bot itself
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
        not_null={"conversation_id", "role", "text", "created_at"},
    )
    db["messages"].create_index(["conversation_id", "id"])

    db["feedback"].create(
        {"id": int, "message_id": int, "user_id": int, "rating": int, "created_at": str},
        pk="id",
        foreign_keys=[("message_id", "messages", "id"), ("user_id", "users", "id")],
        not_null={"message_id", "rating", "created_at"},
    )
    # One rating per person per message: rating again replaces it.
    db["feedback"].create_index(["message_id", "user_id"], unique=True)

    db["corrections"].create(
        {
            "id": int,
            "message_id": int,  # the assistant message corrected, NULL for imports
            "question": str,
            "wrong_answer": str,
            "corrected_answer": str,
            "submitter": str,
            "channel": str,  # web | telegram | cli | import
            "status": str,  # pending | approved | rejected
            "reviewer": str,
            "created_at": str,
            "reviewed_at": str,
            "dedupe_key": str,  # normalized question + answer: the same fix twice is one row
        },
        pk="id",
        foreign_keys=[("message_id", "messages", "id")],
        not_null={"question", "corrected_answer", "channel", "status", "created_at", "dedupe_key"},
        defaults={"status": "pending"},
    )
    db["corrections"].create_index(["dedupe_key"], unique=True)
    db["corrections"].create_index(["status", "id"])

    db["identity_profiles"].create(
        {"id": int, "name": str, "author": str, "description": str, "changed_by": str, "created_at": str},
        pk="id",
        not_null={"name", "author", "created_at"},
    )

    db["training_runs"].create(
        {
            "id": int,
            "status": str,  # queued | running | promoted | rejected | failed | cancelled | skipped
            "trigger": str,  # cli | web | telegram | schedule
            "requested_by": str,
            "stage": str,  # what it is doing now: dataset, training, evaluating, activating
            "step": int,
            "total_steps": int,
            "loss": float,
            "eta_s": float,
            "recipe": str,  # JSON
            "dataset_hash": str,
            "dataset_rows": int,
            "metrics": str,  # JSON: evaluation of the candidate
            "report": str,  # JSON: the whole run report
            "adapter_version": int,
            "error": str,
            "log": str,
            "pid": int,  # the process that owns a running run; a dead pid means the run died
            "host": str,
            "heartbeat_at": str,
            "cancel_requested": int,
            "notified": int,  # front ends that announce outcomes mark it here
            "created_at": str,
            "started_at": str,
            "finished_at": str,
        },
        pk="id",
        not_null={"status", "trigger", "created_at"},
        defaults={"cancel_requested": 0, "notified": 0},
    )
    db["training_runs"].create_index(["status"])

    db["run_losses"].create(
        {"run_id": int, "step": int, "loss": float, "at": str},
        pk=("run_id", "step"),
        foreign_keys=[("run_id", "training_runs", "id")],
    )

    db["adapters"].create(
        {
            "version": int,
            "path": str,
            "base_model": str,
            "run_id": int,
            "metrics": str,  # JSON
            "active": int,
            "created_at": str,
            "activated_at": str,
        },
        pk="version",
        not_null={"path", "base_model", "created_at"},
        defaults={"active": 0},
    )
    # Rollback walks this history backwards.
    db["activations"].create(
        # version NULL = base model; kind: activate | rollback (a rollback pops the activation stack)
        {"id": int, "version": int, "kind": str, "activated_by": str, "at": str},
        pk="id",
    )

    db["settings"].create({"key": str, "value": str, "updated_at": str}, pk="key")


@migrations()
def m002_job_runners(db: Database) -> None:
    # Each job runner (in `selfcog serve`) beats here on every poll, so a front end that queues a
    # retrain can tell whether anything will pick it up.
    db["job_runners"].create({"host": str, "pid": int, "heartbeat_at": str}, pk=("host", "pid"),
                             not_null={"heartbeat_at"})


def schema_version(db: Database) -> int:
    return len(migrations.applied(db))
