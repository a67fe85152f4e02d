// The natter chat workload as a typical developer writes it with Node and the `ws` package.
//
// GET /api/ws/chat/{bot_id}?token=... : a JWT (HS256, shared secret in BENCH_JWT_SECRET) is
// checked on connect, then `connection_established`; each `message` gets an `ack` and the echoed
// bot reply as a `message` frame, with per-connection sequence numbers kept in memory. No
// storage, no idempotency, no resume: that is what natter does on top.
//
// Run: BENCH_JWT_SECRET=... PORT=8102 node server.js
'use strict';
const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');
const jwt = require('jsonwebtoken');

const SECRET = process.env.BENCH_JWT_SECRET || 'bench-secret';
const PORT = Number(process.env.PORT || 8102);

const server = http.createServer((req, res) => {
  if (req.url === '/api/health') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"status":"ok"}');
  } else {
    res.writeHead(404);
    res.end();
  }
});
const wss = new WebSocketServer({ noServer: true });

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  const m = url.pathname.match(/^\/api\/ws\/chat\/([^/]+)$/);
  if (!m) {
    socket.destroy();
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => onChat(ws, m[1], url.searchParams.get('token') || ''));
});

function onChat(ws, botId, token) {
  let claims;
  try {
    claims = jwt.verify(token, SECRET, { algorithms: ['HS256'] });
  } catch (e) {
    ws.close(4401, 'invalid token');
    return;
  }
  const conversationId = crypto.randomUUID();
  let seq = 0;
  ws.send(JSON.stringify({
    type: 'connection_established',
    connection_id: crypto.randomUUID(),
    protocol_version: 1,
    user: { id: claims.sub, username: claims.name },
    bot: { id: botId, name: 'Echo' },
    conversation_id: conversationId,
    last_seq: seq,
    heartbeat_interval_ms: 25000,
    server_time: new Date().toISOString(),
  }));
  ws.on('message', (data) => {
    let f;
    try {
      f = JSON.parse(data);
    } catch (e) {
      return;
    }
    if (f.type !== 'message') return;
    const userMsg = {
      id: crypto.randomUUID(), conversation_id: conversationId, seq: ++seq, role: 'user',
      content: f.content, created_at: new Date().toISOString(), client_id: f.client_id, status: 'complete',
    };
    ws.send(JSON.stringify({ type: 'ack', client_id: f.client_id, duplicate: false, message: userMsg }));
    const botMsg = {
      id: crypto.randomUUID(), conversation_id: conversationId, seq: ++seq, role: 'bot',
      content: f.content, created_at: new Date().toISOString(), in_reply_to: userMsg.id, status: 'complete',
    };
    ws.send(JSON.stringify({ type: 'message', message: botMsg }));
  });
}

server.listen(PORT, '127.0.0.1');
