"""Conversations, their messages, and 👍/👎 feedback on assistant messages."""

from __future__ import annotations

from store.db import StoreError, utcnow


class Conversations:
    def __init__(self, store):
        self.store = store

    def start(self, channel: str, chat_key: str | None = None, user_id: int | None = None) -> int:
        """A new conversation; chat_key names where it happens (a browser session, a Telegram chat)."""
        now = utcnow()
        return self.store.db["conversations"].insert(
            {"user_id": user_id, "channel": channel, "chat_key": chat_key, "created_at": now, "updated_at": now}
        ).last_pk

    def latest(self, channel: str, chat_key: str) -> int | None:
        """The newest conversation held at chat_key, if any."""
        rows = list(self.store.db["conversations"].rows_where(
            "channel = ? and chat_key = ?", [channel, chat_key], order_by="id desc", limit=1))
        return rows[0]["id"] if rows else None

    def get(self, conversation_id: int) -> dict:
        rows = list(self.store.db["conversations"].rows_where("id = ?", [conversation_id]))
        if not rows:
            raise StoreError(f"conversation {conversation_id} does not exist")
        return rows[0]

    def add_message(self, conversation_id: int, role: str, text: str, **stats) -> int:
        """Append a message; stats are adapter_version, latency_ms, first_token_ms, token counts..."""
        now = utcnow()
        with self.store.transaction() as db:
            message_id = db["messages"].insert(
                {"conversation_id": conversation_id, "role": role, "text": text, "created_at": now, **stats}
            ).last_pk
            db["conversations"].update(conversation_id, {"updated_at": now})
        return message_id

    def messages(self, conversation_id: int) -> list[dict]:
        return list(self.store.db["messages"].rows_where("conversation_id = ?", [conversation_id], order_by="id"))

    def message(self, message_id: int) -> dict:
        rows = list(self.store.db["messages"].rows_where("id = ?", [message_id]))
        if not rows:
            raise StoreError(f"message {message_id} does not exist")
        return rows[0]

    def question_before(self, message_id: int) -> dict | None:
        """The user message an assistant message answered."""
        message = self.message(message_id)
        rows = list(self.store.db["messages"].rows_where(
            "conversation_id = ? and id < ? and role = 'user'", [message["conversation_id"], message_id],
            order_by="id desc", limit=1))
        return rows[0] if rows else None

    def rate(self, message_id: int, user_id: int | None, rating: int) -> None:
        """Record 👍 (+1) or 👎 (-1); rating the same message again replaces the earlier rating."""
        if rating not in (1, -1):
            raise StoreError("a rating is +1 or -1")
        if self.message(message_id)["role"] != "assistant":
            raise StoreError("only the bot's answers can be rated")
        with self.store.transaction() as db:
            db.execute("delete from feedback where message_id = ? and user_id is ?", [message_id, user_id])
            db["feedback"].insert({"message_id": message_id, "user_id": user_id, "rating": rating, "created_at": utcnow()})

    def ratings(self, message_id: int) -> dict:
        row = self.store.db.execute(
            "select sum(rating > 0), sum(rating < 0) from feedback where message_id = ?", [message_id]).fetchone()
        return {"up": row[0] or 0, "down": row[1] or 0}

    def stats(self) -> dict:
        db = self.store.db
        row = db.execute(
            "select count(*), sum(role = 'assistant'), avg(case when role = 'assistant' then latency_ms end), "
            "sum(identity_question) from messages").fetchone()
        return {"conversations": db["conversations"].count, "messages": row[0], "answers": row[1] or 0,
                "avg_latency_ms": round(row[2]) if row[2] else None, "identity_questions": row[3] or 0}
