"""The natter chat workload as a typical developer writes it with FastAPI + aiosqlite, durably.

Like ../fastapi/app.py (same wire protocol, same JWT check), but every user message and every
echo reply is stored in SQLite (WAL, synchronous=NORMAL, as natter runs it) before it is sent:
one conversation per (user, bot), found or created on connect and resumed from its last seq;
each message takes the conversation's next seq in the transaction that stores it; client_id is
unique per conversation, and a resend is answered with the stored message (`duplicate: true`).
One shared aiosqlite connection (SQLite has one writer), its transactions serialised by an
asyncio.Lock. No resume replay (after_seq), no rate limits, no ledger: those natter does on top.

Run: BENCH_JWT_SECRET=... BENCH_DB=/tmp/chat.db uvicorn app:app --host 127.0.0.1 --port 8103 --no-access-log
"""

import asyncio
import json
import os
import sqlite3
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone

import aiosqlite
import jwt
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

SECRET = os.environ.get("BENCH_JWT_SECRET", "bench-secret")
DB_PATH = os.environ.get("BENCH_DB", "chat.db")

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    bot_id     TEXT NOT NULL,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    UNIQUE (user_id, bot_id)
);
CREATE TABLE IF NOT EXISTS messages (
    id              TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    seq             INTEGER NOT NULL,
    role            TEXT NOT NULL,
    content         TEXT NOT NULL,
    client_id       TEXT,
    in_reply_to     TEXT,
    created_at      TEXT NOT NULL,
    UNIQUE (conversation_id, seq),
    UNIQUE (conversation_id, client_id)
);
"""


class Db:
    """The app's one connection; `transaction()` gives it to one coroutine at a time."""

    conn: aiosqlite.Connection
    lock = asyncio.Lock()

    @asynccontextmanager
    async def transaction(self):
        async with self.lock:
            try:
                yield self.conn
                await self.conn.commit()
            except BaseException:
                await self.conn.rollback()
                raise


db = Db()


@asynccontextmanager
async def lifespan(app):
    db.conn = await aiosqlite.connect(DB_PATH)
    db.conn.row_factory = aiosqlite.Row
    await db.conn.execute("PRAGMA journal_mode=WAL")
    await db.conn.execute("PRAGMA synchronous=NORMAL")
    await db.conn.executescript(SCHEMA)
    await db.conn.commit()
    yield
    await db.conn.close()


app = FastAPI(lifespan=lifespan)


def now():
    return datetime.now(timezone.utc).isoformat()


async def open_conversation(user_id, bot_id):
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO conversations (id, user_id, bot_id, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (user_id, bot_id) DO NOTHING",
            (str(uuid.uuid4()), user_id, bot_id, now()))
        cur = await conn.execute(
            "SELECT id, last_seq FROM conversations WHERE user_id = ? AND bot_id = ?", (user_id, bot_id))
        row = await cur.fetchone()
    return row["id"], row["last_seq"]


async def store_message(conversation_id, role, content, client_id=None, in_reply_to=None):
    """Stores a message with the conversation's next seq; returns it as a dict."""
    msg = {"id": str(uuid.uuid4()), "conversation_id": conversation_id, "role": role,
           "content": content, "created_at": now(), "status": "complete"}
    async with db.transaction() as conn:
        cur = await conn.execute(
            "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
            (conversation_id,))
        msg["seq"] = (await cur.fetchone())[0]
        await conn.execute(
            "INSERT INTO messages (id, conversation_id, seq, role, content, client_id, in_reply_to, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (msg["id"], conversation_id, msg["seq"], role, content, client_id, in_reply_to, msg["created_at"]))
    if client_id is not None:
        msg["client_id"] = client_id
    if in_reply_to is not None:
        msg["in_reply_to"] = in_reply_to
    return msg


async def stored_by_client_id(conversation_id, client_id):
    async with db.transaction() as conn:
        cur = await conn.execute(
            "SELECT id, conversation_id, seq, role, content, client_id, created_at FROM messages "
            "WHERE conversation_id = ? AND client_id = ?", (conversation_id, client_id))
        row = await cur.fetchone()
    return dict(row, status="complete")


@app.get("/api/health")
async def health():
    return {"status": "ok"}


@app.websocket("/api/ws/chat/{bot_id}")
async def chat(websocket: WebSocket, bot_id: str, token: str = ""):
    await websocket.accept()
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    except jwt.PyJWTError:
        await websocket.close(code=4401, reason="invalid token")
        return
    conversation_id, last_seq = await open_conversation(claims["sub"], bot_id)
    await websocket.send_text(json.dumps({
        "type": "connection_established",
        "connection_id": str(uuid.uuid4()),
        "protocol_version": 1,
        "user": {"id": claims["sub"], "username": claims.get("name", "")},
        "bot": {"id": bot_id, "name": "Echo"},
        "conversation_id": conversation_id,
        "last_seq": last_seq,
        "heartbeat_interval_ms": 25000,
        "server_time": now(),
    }))
    try:
        while True:
            data = json.loads(await websocket.receive_text())
            if data.get("type") != "message":
                continue
            try:
                user_msg = await store_message(conversation_id, "user", data["content"], client_id=data["client_id"])
            except sqlite3.IntegrityError:
                # A resend: the client_id is stored already.
                stored = await stored_by_client_id(conversation_id, data["client_id"])
                await websocket.send_text(json.dumps(
                    {"type": "ack", "client_id": data["client_id"], "duplicate": True, "message": stored}))
                continue
            await websocket.send_text(json.dumps(
                {"type": "ack", "client_id": data["client_id"], "duplicate": False, "message": user_msg}))
            bot_msg = await store_message(conversation_id, "bot", data["content"], in_reply_to=user_msg["id"])
            await websocket.send_text(json.dumps({"type": "message", "message": bot_msg}))
    except WebSocketDisconnect:
        pass
