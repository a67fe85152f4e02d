// An HTTP reverse proxy on 127.0.0.1 that forwards plain HTTP as it streams (no buffering, so an
// event stream flows event by event) but cannot carry a WebSocket, as many corporate proxies and
// an nginx without `proxy_set_header Upgrade/Connection` behave. Two ways to fail the upgrade:
// - `strip`: `Upgrade` and `Connection` are hop-by-hop headers (RFC 9110 §7.6.1); a proxy that
//   does not implement upgrades drops them and forwards a plain GET, and the server's answer (not
//   a 101) goes back to the browser. This is what nginx does by default.
// - `refuse`: the proxy answers the upgrade itself with 400 and never asks the server.
// - `pass`: the network is fixed: upgrades go through to the server, bytes piped both ways.
// `setMode` switches between them while the proxy runs.
// The Host header is forwarded as the browser sent it (as `proxy_set_header Host $host`), so the
// server sees the page's own origin.

import { Agent, createServer, request } from 'node:http';
import { connect } from 'node:net';

const HOP_BY_HOP = ['connection', 'upgrade', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding'];

function forwardHeaders(headers) {
  const out = { ...headers };
  for (const h of HOP_BY_HOP) delete out[h];
  return out;
}

/** Starts the proxy in front of `upstreamPort`; `stats.upgrades` counts the WebSocket upgrades it was asked for. */
export async function startNoUpgradeProxy(upstreamPort, { mode: initialMode = 'strip' } = {}) {
  let mode = initialMode;
  // No keep-alive towards the server: a restarted server never meets a stale pooled socket.
  const agent = new Agent({ keepAlive: false });
  const stats = { upgrades: 0, requests: 0 };
  const upstream = (req, onResponse, onError) => {
    const up = request(
      { host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers: forwardHeaders(req.headers), agent },
      onResponse,
    );
    up.on('error', onError);
    return up;
  };
  const server = createServer((req, res) => {
    stats.requests++;
    const up = upstream(
      req,
      (ur) => {
        res.writeHead(ur.statusCode, ur.statusMessage, forwardHeaders(ur.headers));
        res.flushHeaders();
        ur.on('data', (chunk) => res.write(chunk));
        ur.on('end', () => res.end());
        ur.on('error', () => res.destroy());
        ur.on('aborted', () => res.destroy());
      },
      () => {
        if (!res.headersSent) {
          res.writeHead(502, { 'Content-Type': 'text/plain' });
          res.end('bad gateway: the server did not answer');
        } else res.destroy();
      },
    );
    // The browser went away (an aborted fetch, a closed tab): so does the request to the server.
    res.on('close', () => up.destroy());
    req.pipe(up);
  });
  server.on('upgrade', (req, socket, head) => {
    stats.upgrades++;
    socket.on('error', () => {});
    if (mode === 'pass') {
      const up = connect(upstreamPort, '127.0.0.1', () => {
        const lines = [`${req.method} ${req.url} HTTP/1.1`];
        for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
        up.write(`${lines.join('\r\n')}\r\n\r\n`);
        if (head.length) up.write(head);
        up.pipe(socket);
        socket.pipe(up);
      });
      up.on('error', () => socket.destroy());
      up.on('close', () => socket.destroy());
      socket.on('close', () => up.destroy());
      return;
    }
    if (mode === 'refuse') {
      socket.end(
        'HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 26\r\nConnection: close\r\n\r\nWebSocket is not allowed.\n',
      );
      return;
    }
    // `strip`: a plain GET to the server, whose answer goes back as is, then the connection ends.
    const up = upstream(
      req,
      (ur) => {
        const head = [`HTTP/1.1 ${ur.statusCode} ${ur.statusMessage}`];
        for (const [k, v] of Object.entries(forwardHeaders(ur.headers))) for (const one of [v].flat()) head.push(`${k}: ${one}`);
        head.push('Connection: close', '', '');
        socket.write(head.join('\r\n'));
        ur.pipe(socket);
      },
      () => socket.end('HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'),
    );
    socket.on('close', () => up.destroy());
    up.end();
  });
  const port = await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)));
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    stats,
    setMode: (m) => {
      mode = m;
    },
    close: () => {
      server.closeAllConnections?.();
      server.close();
      agent.destroy();
    },
  };
}
