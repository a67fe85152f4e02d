"""The natter chat workload as a typical developer writes it with FastAPI + uvicorn.

GET /api/ws/chat/{bot_id}?token=... : a JWT (HS256, shared secret in BENCH_JWT_SECRET) is
checked on connect, then `connection_established`; each `message` gets an `ack` and the echoed
bot reply as a `message` frame, with per-connection sequence numbers kept in memory. No
storage, no idempotency, no resume: that is what natter does on top.

Run: BENCH_JWT_SECRET=... uvicorn app:app --host 127.0.0.1 --port 8101 --no-access-log
"""

import json
import os
import uuid
from datetime import datetime, timezone

import jwt
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

SECRET = os.environ.get("BENCH_JWT_SECRET", "bench-secret")
app = FastAPI()


def now():
    return datetime.now(timezone.utc).isoformat()


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
    conversation_id = str(uuid.uuid4())
    seq = 0
    await websocket.send_text(json.dumps({
        "type": "connection_established",
        "connection_id": str(uuid.uuid4()),
        "protocol_version": 1,
        "user": {"id": claims["sub"], "username": claims.get("name", "")},
        "bot": {"id": bot_id, "name": "Echo"},
        "conversation_id": conversation_id,
        "last_seq": seq,
        "heartbeat_interval_ms": 25000,
        "server_time": now(),
    }))
    try:
        while True:
            data = json.loads(await websocket.receive_text())
            if data.get("type") != "message":
                continue
            seq += 1
            user_msg = {
                "id": str(uuid.uuid4()), "conversation_id": conversation_id, "seq": seq,
                "role": "user", "content": data["content"], "created_at": now(),
                "client_id": data["client_id"], "status": "complete",
            }
            await websocket.send_text(json.dumps(
                {"type": "ack", "client_id": data["client_id"], "duplicate": False, "message": user_msg}))
            seq += 1
            bot_msg = {
                "id": str(uuid.uuid4()), "conversation_id": conversation_id, "seq": seq,
                "role": "bot", "content": data["content"], "created_at": now(),
                "in_reply_to": user_msg["id"], "status": "complete",
            }
            await websocket.send_text(json.dumps({"type": "message", "message": bot_msg}))
    except WebSocketDisconnect:
        pass
