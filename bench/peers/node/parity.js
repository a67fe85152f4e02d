// Do two peers answer alike? The same tokens (valid, expired, wrong key, HS512, no exp, …) and the
// same frames (a message, junk, another type, null and non-string content) to both, and their
// answers compared with ids and timestamps masked (checked for shape instead).
//
// Run, with both peers started with BENCH_JWT_SECRET=SECRET:
//   node bench/peers/node/parity.js PORT_A PORT_B SECRET      (exit code 1 on a difference)
const WebSocket = require('ws');
const jwt = require('jsonwebtoken');
const [portA, portB, S] = process.argv.slice(2);
const now = Math.floor(Date.now() / 1000);
const cases = {
  good: jwt.sign({ sub: 'u1', name: 'alice', iat: now, exp: now + 100 }, S),
  noexp: jwt.sign({ sub: 'u2' }, S, { noTimestamp: true }),
  expired: jwt.sign({ sub: 'u3', exp: now - 1 }, S),
  expnow: jwt.sign({ sub: 'u3', exp: now }, S),
  future_nbf: jwt.sign({ sub: 'u4', nbf: now + 100 }, S),
  aud: jwt.sign({ sub: 'u5', aud: 'x', iss: 'y' }, S),
  wrongkey: jwt.sign({ sub: 'u6' }, 'other'),
  hs512: jwt.sign({ sub: 'u7' }, S, { algorithm: 'HS512' }),
  empty: '',
};
const frames = ['{"type":"message","content":"hi","client_id":"c1"}', 'not json', '{"type":"ping"}',
  '{"type":"message","content":null}', '{"type":"message","content":{"a":[1,2]},"client_id":7}'];
function run(port, name, token) {
  return new Promise((res) => {
    const out = [];
    const ws = new WebSocket(`ws://127.0.0.1:${port}/api/ws/chat/bot-1?token=${encodeURIComponent(token)}`);
    ws.on('message', (d) => {
      const f = JSON.parse(d);
      out.push(f);
      if (f.type === 'connection_established') frames.forEach((x) => ws.send(x));
      if (out.length === 1 + 2 * 3) ws.close();
    });
    ws.on('close', (code, reason) => res({ name, code, reason: reason.toString(), out }));
    ws.on('error', (e) => res({ name, error: e.message }));
  });
}
function shape(v) {
  if (v === null || typeof v !== 'object') return v;
  const o = Array.isArray(v) ? [] : {};
  for (const [k, x] of Object.entries(v)) {
    o[k] = /^(id|connection_id|conversation_id|in_reply_to)$/.test(k) && typeof x === 'string' && x.length === 36 ? 'UUID'
      : /(_at|_time)$/.test(k) ? (/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/.test(x) ? 'ISO' : 'BAD:' + x) : shape(x);
  }
  return o;
}
(async () => {
  let same = true;
  for (const [n, t] of Object.entries(cases)) {
    const [x, y] = [await run(portA, n, t), await run(portB, n, t)];
    const [sx, sy] = [JSON.stringify(shape(x)), JSON.stringify(shape(y))];
    const eq = sx === sy;
    same = same && eq;
    console.log(eq ? 'same' : 'DIFF', n, eq ? sx.slice(0, 300) : `\n node: ${sx}\n axum: ${sy}`);
  }
  console.log(same ? 'ALL SAME' : 'DIFFERENCES');
  process.exitCode = same ? 0 : 1;
})();
