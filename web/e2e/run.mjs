// Browser tests of the client library (issue 5) and the web app (issue 6) against real natter
// servers, in Debian's headless chromium. Needs web/dist built and target/debug/natter.
// Usage: node e2e/run.mjs [name-filter]. Prints "N passed, N failed" last; exits 1 on failure.

import { createServer as createHttpServer } from 'node:http';
import {
  api,
  freePort,
  assert,
  checkPrerequisites,
  launchBrowser,
  login,
  loginPage,
  registerAndLogin,
  sendMessage,
  shownMessages,
  sleep,
  startServer,
  stopAll,
  waitState,
  watchStates,
} from './harness.mjs';
import { startNoUpgradeProxy } from './proxy.mjs';

const SCENARIO_TIMEOUT_MS = Number(process.env.E2E_TIMEOUT_MS ?? 90_000);
const filter = process.argv[2] ?? '';
const scenarios = [];
const scenario = (name, fn) => scenarios.push({ name, fn });

let browser;
/** A fresh browser context per scenario: its own localStorage and sessionStorage. */
async function newPage(ctxOpts = {}) {
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 760 }, ...ctxOpts });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.log(`    [page error] ${e.message}`));
  return { ctx, page };
}

async function demoBotId(srv, token) {
  const bots = await api(srv.url, '/api/bots', { token });
  const echo = bots.find((b) => b.name === 'Echo');
  assert(echo, 'the demo server has an Echo bot');
  return echo.id;
}

/** Counts sockets and selected requests a page makes. */
function countTraffic(page) {
  const c = { sockets: [], health: 0, refresh: 0, ticket: 0 };
  page.on('websocket', (ws) => c.sockets.push(ws.url()));
  page.on('request', (r) => {
    const u = r.url();
    if (u.endsWith('/api/health')) c.health++;
    if (u.endsWith('/api/auth/refresh')) c.refresh++;
    if (u.endsWith('/api/ws/ticket')) c.ticket++;
  });
  return c;
}

// ---- issue 5: the library ---------------------------------------------------------------

scenario('connect and chat (log in through the form)', async () => {
  const srv = await startServer();
  const { page } = await newPage();
  // Verbose logs on, as the debugging guide says; every console line is kept.
  await page.addInitScript(() => localStorage.setItem('debug', 'websocket:*'));
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(m.text()));
  await page.goto(`${srv.url}/`);
  await page.fill('[data-testid=username]', 'demo');
  await page.fill('[data-testid=password]', 'demo-password');
  await page.click('[data-testid=auth-submit]');
  await page.click('[data-testid=chat-link] >> text=Echo');
  await waitState(page, 'open');
  await page.waitForSelector('[data-testid=status-label]:text-is("Connected")');
  const traffic = countTraffic(page);
  await sendMessage(page, 'hello natter');
  await page.waitForSelector('.msg.bot .body > p:text-is("hello natter")', { timeout: 10_000 });
  await page.waitForSelector('.msg.user[data-status=sent] .body:text-is("hello natter")');
  const shown = await shownMessages(page);
  assert(shown.length === 2, `two messages shown, got ${JSON.stringify(shown)}`);
  assert(shown[0].seq === 1 && shown[1].seq === 2, 'seqs 1 and 2');
  // The token never appears in a socket URL: the library uses a ticket.
  const urls = await page.evaluate(() =>
    JSON.parse(window.chatWebSocketService.exportFlightRecorder())
      .events.filter((e) => e.type === 'ws_connect')
      .map((e) => e.url),
  );
  assert(
    urls.length >= 1 && urls.every((u) => u.includes('ticket=<redacted>') && !u.includes('token=')),
    `socket URLs use tickets: ${urls}`,
  );
  assert(traffic.sockets.length === 0, 'no new socket for sending');
  // The logs say what happened, and never give a credential away.
  const logs = consoleLines.join('\n');
  assert(
    /websocket:state/.test(logs) && /Attempting to connect to chat WebSocket/.test(logs) && /connection established/.test(logs),
    `verbose logs present: ${logs.slice(0, 500)}`,
  );
  const secrets = await page.evaluate(() => [localStorage.getItem('access_token'), localStorage.getItem('refresh_token')]);
  assert(
    secrets.every((x) => x && !logs.includes(x)),
    'no token in the console',
  );
  assert(!/ticket=(?!<redacted>)/.test(logs), 'no ticket in the console');
});

async function restartScenario(signal) {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { page } = await newPage();
  await loginPage(page, srv, t, 'demo');
  await page.goto(`${srv.url}/#/chat/${botId}`);
  await waitState(page, 'open');
  await watchStates(page);
  for (const m of ['one', 'two']) {
    await sendMessage(page, m);
    await page.waitForSelector(`.msg.bot .body > p:text-is("${m}")`);
  }
  await srv.kill(signal);
  await page.waitForFunction(() => ['reconnecting', 'backend_unavailable'].includes(window.chatWebSocketService.state.kind), null, {
    timeout: 10_000,
  });
  // Typed while the server is down: queued, then sent on reconnect.
  await sendMessage(page, 'three (typed while down)');
  await page.waitForSelector('.msg.user[data-status=pending] .body:text-is("three (typed while down)")');
  await sleep(1500);
  await srv.start();
  await waitState(page, 'open', 40_000);
  await page.waitForSelector('.msg.bot .body > p:text-is("three (typed while down)")', { timeout: 10_000 });
  await sendMessage(page, 'four');
  await page.waitForSelector('.msg.bot .body > p:text-is("four")');
  const labels = await page.evaluate(() => window.__labels);
  const iRe = labels.findIndex((l) => /— reconnecting|^Can't reach the server/.test(l));
  assert(iRe >= 0, `indicator showed reconnecting: ${JSON.stringify(labels)}`);
  const said = signal === 'SIGTERM' ? /^The server is restarting — reconnecting/ : /^Connection lost — reconnecting/;
  assert(
    labels.some((l) => said.test(l)),
    `indicator said ${said}: ${JSON.stringify(labels)}`,
  );
  assert(
    labels.every((l) => !/\b[a-z]+_[a-z_]+\b|\b[14]\d{3}\b|fetch/i.test(l)),
    `plain words only: ${JSON.stringify(labels)}`,
  );
  assert(labels.slice(iRe).includes('Connected'), `then Connected: ${JSON.stringify(labels)}`);
  const shown = await shownMessages(page);
  const server = await api(srv.url, `/api/bots/${botId}/messages?limit=100`, { token: t.access_token });
  assert(server.messages.length === 8, `server stored 8 messages, got ${server.messages.length}`);
  assert(
    JSON.stringify(shown.map((m) => m.seq)) === JSON.stringify(server.messages.map((m) => m.seq)),
    `shown seqs ${shown.map((m) => m.seq)} = stored ${server.messages.map((m) => m.seq)}`,
  );
  assert(JSON.stringify(shown.map((m) => m.text)) === JSON.stringify(server.messages.map((m) => m.content)), 'shown texts = stored texts');
  const outbox = await page.evaluate(() => sessionStorage.getItem('natter.outbox'));
  assert(outbox === null, 'outbox empty');
  const closes = await page.evaluate(() =>
    JSON.parse(window.chatWebSocketService.exportFlightRecorder())
      .events.filter((e) => e.type === 'close')
      .map((e) => e.code),
  );
  assert(closes[0] === (signal === 'SIGTERM' ? 1012 : 1006), `first close ${closes[0]} for ${signal}`);
}

scenario('server killed (SIGKILL) and restarted: reconnects, nothing lost or doubled', () => restartScenario('SIGKILL'));
scenario('server stopped (SIGTERM, 1012) and restarted: reconnects, nothing lost or doubled', () => restartScenario('SIGTERM'));

scenario('issue 17: transport sse (library): chats over HTTP streaming, echo reply once, no WebSocket', async () => {
  const srv = await startServer({ args: ['--heartbeat-interval-ms', '2000'] });
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { page } = await newPage();
  await page.goto(`${srv.url}/#/login`);
  const traffic = countTraffic(page);
  const result = await page.evaluate(
    async ({ botId, token }) => {
      const s = new window.natter.ChatSocket({ transport: 'sse', storage: null, getToken: () => token });
      const messages = [];
      s.on('message', (m) => messages.push(m));
      s.connect(botId);
      const until = async (ok) => {
        const t0 = Date.now();
        while (!ok() && Date.now() - t0 < 15000) await new Promise((r) => setTimeout(r, 50));
      };
      await until(() => s.state.kind === 'open' || s.state.kind === 'failed');
      const state = { ...s.state };
      const ack = await s.send('hello over sse');
      await until(() => messages.some((m) => m.role !== 'user'));
      const rtt = await s.ping(5000);
      // Twice the server's heartbeat interval: the pings by POST keep the stream alive (no 4408).
      await new Promise((r) => setTimeout(r, 2.5 * state.heartbeatIntervalMs));
      const out = {
        state,
        kind: s.transportKind,
        still: s.state.kind,
        ackSeq: ack.message.seq,
        messages: messages.map((m) => ({ seq: m.seq, role: m.role, content: m.content })),
        rtt,
        urls: JSON.parse(s.exportFlightRecorder())
          .events.filter((e) => e.type === 'ws_connect')
          .map((e) => e.url),
      };
      s.destroy();
      return out;
    },
    { botId, token: t.access_token },
  );
  assert(
    result.state.kind === 'open' && result.state.transport === 'sse' && result.kind === 'sse',
    `open over sse: ${JSON.stringify(result)}`,
  );
  const bot = result.messages.filter((m) => m.role !== 'user');
  assert(
    bot.length === 1 && bot[0].content === 'hello over sse' && bot[0].seq === result.ackSeq + 1,
    `one echo: ${JSON.stringify(result)}`,
  );
  const seqs = result.messages.map((m) => m.seq);
  assert(new Set(seqs).size === seqs.length, `no seq twice: ${seqs}`);
  assert(typeof result.rtt === 'number', `ping answered by POST: ${result.rtt}`);
  assert(result.still === 'open', `still open after 2.5 heartbeats: ${result.still}`);
  assert(
    result.urls.every((u) => u.includes('/api/sse/chat/') && u.includes('ticket=<redacted>')),
    `sse URLs with tickets: ${result.urls}`,
  );
  assert(traffic.sockets.length === 0, 'no WebSocket opened');
});

scenario('4401: one token refresh, then success (library, token in URL)', async () => {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { page } = await newPage();
  await page.goto(`${srv.url}/#/login`);
  const result = await page.evaluate(
    async ({ botId, good }) => {
      let token = 'not-a-valid-token';
      let refreshes = 0;
      const s = new window.natter.ChatSocket({
        useTicket: false,
        storage: null,
        getToken: () => token,
        refreshToken: async () => {
          refreshes++;
          token = good;
          return good;
        },
      });
      const states = [];
      s.on('state', (st) => states.push(st.kind));
      s.connect(botId);
      const t0 = Date.now();
      while (s.state.kind !== 'open' && s.state.kind !== 'failed' && Date.now() - t0 < 15000) await new Promise((r) => setTimeout(r, 50));
      const closes = JSON.parse(s.exportFlightRecorder()).events.filter((e) => e.type === 'close');
      const out = { refreshes, states, closes, final: s.state.kind, exported: s.exportFlightRecorder() };
      s.destroy();
      return out;
    },
    { botId, good: t.access_token },
  );
  assert(result.final === 'open', `ended open: ${JSON.stringify(result.states)}`);
  assert(result.refreshes === 1, `one refresh, got ${result.refreshes}`);
  assert(result.closes.length === 1 && result.closes[0].code === 4401, `one 4401 close: ${JSON.stringify(result.closes)}`);
  assert(!result.exported.includes(t.access_token), 'the flight recorder holds no token');
});

scenario('expired access token in the app: silent refresh, then chat', async () => {
  const srv = await startServer({ args: ['--access-token-ttl-secs', '1'] });
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { page } = await newPage();
  await loginPage(page, srv, t, 'demo');
  await sleep(7000); // the access token is now expired (the server allows 5 s of leeway)
  const traffic = countTraffic(page);
  await page.goto(`${srv.url}/#/chat/${botId}`);
  await waitState(page, 'open');
  await sendMessage(page, 'after refresh');
  await page.waitForSelector('.msg.bot .body > p:text-is("after refresh")');
  assert(traffic.refresh === 1, `exactly one refresh request, got ${traffic.refresh}`);
  // Kill the login elsewhere: logout revokes the login at once (issue 14), so the open chat's
  // socket is closed 4401, the refresh is refused → "Session expired, log in again", by itself.
  const rt = await page.evaluate(() => localStorage.getItem('refresh_token'));
  await api(srv.url, '/api/auth/logout', { method: 'POST', body: { refresh_token: rt } });
  await page.waitForSelector('[data-testid=auth-notice]:text("Session expired, log in again")', { timeout: 10_000 });
  const before = traffic.refresh;
  await sleep(2000);
  assert(traffic.refresh - before <= 1, 'no refresh loop');
});

scenario('4404: failed with advice, no retry loop', async () => {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const { page } = await newPage();
  await loginPage(page, srv, t, 'demo');
  const missing = '11111111-2222-4333-8444-555555555555';
  // The library with the token in the URL, so the socket itself closes with 4404.
  const lib = await page.evaluate(async (botId) => {
    const s = new window.natter.ChatSocket({ useTicket: false, storage: null, getToken: () => localStorage.getItem('access_token') });
    let sockets = 0;
    const Orig = window.WebSocket;
    s.on('state', (st) => st.kind === 'connecting' && sockets++);
    s.connect(botId);
    const t0 = Date.now();
    while (s.state.kind !== 'failed' && Date.now() - t0 < 15000) await new Promise((r) => setTimeout(r, 50));
    await new Promise((r) => setTimeout(r, 4000));
    const st = s.state;
    s.destroy();
    return { st, sockets, ws: typeof Orig };
  }, missing);
  assert(lib.st.kind === 'failed' && lib.st.code === 4404, `failed 4404: ${JSON.stringify(lib.st)}`);
  assert(/no bot/.test(lib.st.reason) && /bot id/i.test(lib.st.advice), `reason and advice: ${JSON.stringify(lib.st)}`);
  assert(lib.sockets === 1, `one socket, no retry loop (got ${lib.sockets})`);
  // The app: the indicator says Failed with the reason; nothing retries.
  const traffic = countTraffic(page);
  await page.goto(`${srv.url}/#/chat/${missing}`);
  await waitState(page, 'failed');
  const label = await page.textContent('[data-testid=status-label]');
  const detail = await page.textContent('[data-testid=status-detail]');
  assert(label === "This bot doesn't exist", `label: ${label}`);
  await page.click('[data-testid=status-more]');
  const tech = await page.textContent('[data-testid=status-tech]');
  assert(
    /^4404 bot_not_found: .*no bot.*Check the bot id/.test(tech),
    `the code, its name, the reason and the registry's advice one click away: ${tech}`,
  );
  assert(/Check the link, or pick the bot from the list/.test(detail), `advice shown: ${detail}`);
  const n = traffic.ticket + traffic.sockets.length;
  await sleep(4000);
  assert(traffic.ticket + traffic.sockets.length === n, 'no retries after failing');
});

scenario('offline emulation pauses retries; back online reconnects at once', async () => {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { ctx, page } = await newPage();
  await loginPage(page, srv, t, 'demo');
  await page.goto(`${srv.url}/#/chat/${botId}`);
  await waitState(page, 'open');
  const traffic = countTraffic(page);
  await ctx.setOffline(true);
  await waitState(page, 'offline', 5000);
  await page.waitForSelector(`[data-testid=status-label]:text-is("You're offline — waiting for the network")`);
  await sendMessage(page, 'typed offline');
  await page.waitForSelector('.msg.user[data-status=pending] .msg-status:text("Queued")');
  await sleep(5000);
  assert(traffic.sockets.length === 0 && traffic.health === 0, `no attempts while offline: ${JSON.stringify(traffic)}`);
  const t0 = Date.now();
  await ctx.setOffline(false);
  await waitState(page, 'open', 5000);
  const took = Date.now() - t0;
  assert(took < 5000, `reconnected at once (${took} ms)`);
  await page.waitForSelector('.msg.bot .body > p:text-is("typed offline")');
});

scenario('diagnostics name the failing step: bad token, missing bot, stopped server', async () => {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { page } = await newPage();
  await loginPage(page, srv, t, 'demo');
  await page.goto(`${srv.url}/#/bots`);
  const run = (b, tok) => page.evaluate(([b, tok]) => window.runWebSocketDiagnostics(b, tok), [b, tok]);
  const good = await run(botId, t.access_token);
  assert(good.summary.status !== 'fail', `all good: ${JSON.stringify(good.steps.filter((s) => s.status === 'fail'))}`);
  for (const id of ['api', 'ready', 'token_accepted', 'bot', 'preflight', 'handshake', 'established', 'ping', 'stability']) {
    assert(good.steps.find((s) => s.id === id)?.status === 'ok', `step ${id} ok: ${JSON.stringify(good.steps.find((s) => s.id === id))}`);
  }
  const badToken = await run(botId, 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.bad-signature-here');
  assert(badToken.summary.failing_step === 'token_accepted', `bad token → token_accepted: ${badToken.summary.failing_step}`);
  assert(!JSON.stringify(badToken).includes('bad-signature-here'), 'the report holds no token');
  const noBot = await run('11111111-2222-4333-8444-555555555555', t.access_token);
  assert(noBot.summary.failing_step === 'bot', `missing bot → bot: ${noBot.summary.failing_step}`);
  assert(!JSON.stringify(good).includes(t.access_token), 'no token in the report');
  await srv.kill();
  const down = await run(botId, t.access_token);
  assert(down.summary.failing_step === 'api', `stopped server → api: ${down.summary.failing_step}`);
  assert(/Start the server/.test(down.steps.find((s) => s.id === 'api').fix), 'suggests starting the server');
  // testWebSocket, as the seed's console snippet calls it.
  await srv.start();
  const quick = await page.evaluate((b) => window.testWebSocket(b, localStorage.getItem('access_token')), botId);
  assert(
    quick.ok && quick.steps.map((s) => s.step).join() === 'health,ticket,open,connection_established,ping,close',
    `testWebSocket: ${JSON.stringify(quick)}`,
  );
});

scenario('cross-origin API: a CORS refusal is named; an allowed origin works', async () => {
  const page0 = await startServer({ demo: false }); // serves the page only
  const refusing = await startServer();
  const allowing = await startServer({ args: ['--allowed-origin', page0.url] });
  const { page } = await newPage();
  await page.goto(`${page0.url}/#/login`);
  for (const [srv, expectOk] of [
    [refusing, false],
    [allowing, true],
  ]) {
    const t = await login(srv.url, 'demo', 'demo-password');
    const botId = await demoBotId(srv, t.access_token);
    const r = await page.evaluate(
      ([api, bot, tok]) => window.natter.runWebSocketDiagnostics(bot, tok, { apiUrl: api, stabilityMs: 500 }),
      [srv.url, botId, t.access_token],
    );
    if (expectOk) {
      assert(r.summary.status !== 'fail', `allowed origin works: ${JSON.stringify(r.steps.filter((x) => x.status === 'fail'))}`);
      assert(
        r.steps.find((x) => x.id === 'cors').status === 'ok' && r.steps.find((x) => x.id === 'established').status === 'ok',
        'cors ok, socket ok',
      );
    } else {
      assert(r.summary.failing_step === 'cors', `CORS named: ${r.summary.failing_step} ${r.summary.headline}`);
      assert(r.steps.find((x) => x.id === 'cors').fix.includes(`--allowed-origin ${page0.url}`), 'suggests --allowed-origin');
    }
  }
});

// ---- issue 6: the app -------------------------------------------------------------------

scenario('register → create bot → chat', async () => {
  const srv = await startServer({ demo: false });
  const friend = await registerAndLogin(srv.url, 'friend');
  const { page } = await newPage();
  await page.goto(`${srv.url}/`);
  await page.click('[data-testid=to-register]');
  await page.fill('[data-testid=username]', 'newcomer');
  await page.fill('[data-testid=password]', 'short');
  await page.click('[data-testid=auth-submit]');
  await page.waitForSelector('[data-testid=auth-error]:text("8")'); // server's validation message
  await page.fill('[data-testid=password]', 'long-enough-password');
  await page.click('[data-testid=auth-submit]');
  await page.waitForSelector('[data-testid=new-bot]');
  await page.click('[data-testid=new-bot]');
  await page.fill('[data-testid=bot-name]', 'Parrot');
  await page.fill('[data-testid=bot-description]', 'says it back');
  await page.fill('[data-testid=bot-engine-settings]', '{"voice": "loud"}');
  await page.click('[data-testid=bot-save]');
  await page.waitForSelector('[data-testid=bot-error]:text("voice")'); // server validation shown
  await page.fill('[data-testid=bot-engine-settings]', '');
  await page.click('[data-testid=bot-save]');
  await page.waitForSelector('h2:text-is("Share")');
  // Share it: an unknown user is refused with the server's message, a real one is listed.
  await page.fill('[data-testid=share-username]', 'nobody-here');
  await page.click('[data-testid=share-submit]');
  await page.waitForSelector('[data-testid=share-error]:not(:empty)');
  await page.fill('[data-testid=share-username]', 'friend');
  await page.click('[data-testid=share-submit]');
  await page.waitForSelector('[data-testid=members] li[data-member=friend]');
  const friendBots = await api(srv.url, '/api/bots', { token: friend.access_token });
  assert(
    friendBots.some((b) => b.name === 'Parrot' && b.my_role === 'chat'),
    'the friend sees the shared bot',
  );
  await page.click('a:text("Cancel")');
  await page.click('[data-testid=chat-link] >> text=Parrot');
  await waitState(page, 'open');
  await sendMessage(page, 'polly wants a test');
  await page.waitForSelector('.msg.bot .body > p:text-is("polly wants a test")');
  assert((await page.textContent('[data-testid=chat-title]')) === 'Parrot', 'title');
  await page.click('[data-testid=logout]');
  await page.waitForSelector('[data-testid=auth-submit]');
});

/**
 * A webhook bot whose endpoint streams NDJSON deltas: `piecesFor(content)` gives the pieces,
 * written `delayMs` apart. Its server, the demo login and a page open on its chat; call
 * `close()` when done.
 */
/** A webhook bot engine on loopback that streams `piecesFor(content)` as NDJSON deltas, one per `delayMs`. */
async function streamingHook(piecesFor, delayMs) {
  const port = await freePort();
  const hook = createHttpServer(async (req, res) => {
    let body = '';
    for await (const c of req) body += c;
    res.writeHead(200, { 'Content-Type': 'application/x-ndjson' });
    for (const p of piecesFor(JSON.parse(body).message.content)) {
      if (res.destroyed) break;
      res.write(`${JSON.stringify({ delta: p })}\n`);
      await sleep(delayMs);
    }
    res.end();
  });
  await new Promise((r) => hook.listen(port, '127.0.0.1', r));
  const close = () => {
    hook.closeAllConnections?.();
    hook.close();
  };
  return { engine: { kind: 'webhook', url: `http://127.0.0.1:${port}/hook`, secret: '0123456789abcdef0123' }, close };
}

/** A natter server whose users' bots may reach loopback (where the hooks listen; docs/bots.md). */
const startServerForHooks = () => startServer({ args: ['--bot-egress-allow', '127.0.0.1/32'] });

/** Keeps each text a streaming reply shows (`window.__partials`), as it grows. */
async function watchPartials(page) {
  await page.evaluate(() => {
    window.__partials = [];
    new MutationObserver(() => {
      const el = document.querySelector('.msg.bot[data-status=streaming] .body');
      if (el && window.__partials.at(-1) !== el.textContent) window.__partials.push(el.textContent);
    }).observe(document.querySelector('[data-testid=messages]'), { childList: true, subtree: true, characterData: true });
  });
}

async function streamingBot(name, piecesFor, delayMs) {
  const { engine, close } = await streamingHook(piecesFor, delayMs);
  try {
    const srv = await startServerForHooks();
    const t = await login(srv.url, 'demo', 'demo-password');
    const bot = await api(srv.url, '/api/bots', { method: 'POST', token: t.access_token, body: { name, engine } });
    const { page } = await newPage();
    await loginPage(page, srv, t, 'demo');
    await page.goto(`${srv.url}/#/chat/${bot.id}`);
    await waitState(page, 'open');
    return { page, close };
  } catch (e) {
    close();
    throw e;
  }
}

scenario('streamed reply grows token by token, survives a reconnect mid-reply; Stop cancels one', async () => {
  const { page, close } = await streamingBot(
    'Streamer',
    (content) => (content === 'long one' ? Array.from({ length: 30 }, (_, i) => `w${i} `) : ['Stream', 'ing ', 'reply ', 'to: ', content]),
    350,
  );
  try {
    await watchPartials(page);
    await sendMessage(page, 'hi');
    await page.waitForSelector('.msg.bot[data-status=received] .body > p:text-is("Streaming reply to: hi")', { timeout: 15_000 });
    // Markdown: the empty reply's first render shows nothing, and spaces at its end are layout.
    const partials = (await page.evaluate(() => window.__partials)).map((p) => p.trim()).filter(Boolean);
    assert(
      partials.length >= 3 && partials[0] === 'Stream' && partials.includes('Streaming reply'),
      `grew token by token: ${JSON.stringify(partials)}`,
    );
    assert((await page.$$('.msg.bot')).length === 1, 'one reply bubble (deltas and final merged)');
    // Stop a long reply part-way.
    await sendMessage(page, 'long one');
    await page.waitForSelector('.msg.bot[data-status=streaming] [data-testid=msg-stop]', { timeout: 10_000 }).catch(async (e) => {
      console.log(await page.innerHTML('[data-testid=messages]'));
      console.log(await page.evaluate(() => window.chatWebSocketService.exportFlightRecorder()));
      throw e;
    });
    await page.click('.msg.bot[data-status=streaming] [data-testid=msg-stop]');
    await page.waitForSelector('.msg.bot[data-status=received] .msg-status:text("stopped")', { timeout: 10_000 });
    const stopped = await page.textContent('.msg.bot:last-child .body');
    assert(stopped.startsWith('w0') && !stopped.includes('w29'), `cut short: ${stopped}`);
    // Reconnect mid-reply: the stream resumes from its start, shown once, never doubled.
    await page.evaluate(() => (window.__partials = []));
    await sendMessage(page, 'long one');
    await page.waitForFunction(() => (document.querySelector('.msg.bot[data-status=streaming] .body')?.textContent ?? '').includes('w3 '));
    await page.evaluate(() => window.chatWebSocketService.retryNow());
    await page.waitForSelector('.msg.bot[data-status=received] .body:has-text("w29")', { timeout: 20_000 });
    const full = Array.from({ length: 30 }, (_, i) => `w${i} `).join('');
    const partials2 = await page.evaluate(() => window.__partials);
    const bad = partials2.filter((p) => p && !full.startsWith(p));
    assert(bad.length === 0 && partials2.length > 5, `every partial is a prefix of the reply: ${JSON.stringify(bad)}`);
    const bodies = await page.$$eval('.msg.bot .body', (els) => els.map((e) => e.textContent));
    assert(bodies.at(-1).trim() === full.trim() && bodies.length === 3, `final reply once and whole: ${JSON.stringify(bodies)}`);
  } finally {
    close();
  }
});

async function behindNoUpgradeProxy(mode) {
  const reply = (content) => ['Stream', 'ing ', 'reply ', 'to: ', content];
  const hook = await streamingHook(reply, 250);
  let proxy;
  try {
    const srv = await startServerForHooks();
    // Every browser request goes through the proxy, which forwards HTTP as it streams but fails
    // every WebSocket upgrade; the test itself talks to the server directly.
    proxy = await startNoUpgradeProxy(srv.port, { mode });
    const t = await login(srv.url, 'demo', 'demo-password');
    const bot = await api(srv.url, '/api/bots', { method: 'POST', token: t.access_token, body: { name: 'Streamer', engine: hook.engine } });
    const { page } = await newPage();
    const sockets = [];
    page.on('websocket', (ws) => sockets.push(ws));
    // The app as it ships: the default transport (auto), logged in through the form.
    await page.goto(`${proxy.url}/`);
    await page.fill('[data-testid=username]', 'demo');
    await page.fill('[data-testid=password]', 'demo-password');
    await page.click('[data-testid=auth-submit]');
    await page.waitForSelector('[data-testid=chat-link] >> text=Streamer');
    await page.goto(`${proxy.url}/#/chat/${bot.id}`);
    await waitState(page, 'open', 30_000);
    const st = await page.evaluate(() => ({ state: window.chatWebSocketService.state, kind: window.chatWebSocketService.transportKind }));
    assert(st.state.transport === 'sse' && st.kind === 'sse', `open over HTTP streaming: ${JSON.stringify(st)}`);
    assert(proxy.stats.upgrades >= 1 && sockets.length >= 1, `the WebSocket was tried first: ${JSON.stringify(proxy.stats)}`);
    const ev = await page.evaluate(() => JSON.parse(window.chatWebSocketService.exportFlightRecorder()).events);
    const sw = ev.filter((e) => e.type === 'transport_switch');
    assert(sw.length === 1 && sw[0].to === 'sse', `one switch to SSE: ${JSON.stringify(sw)}`);
    await page.waitForSelector('[data-testid=status-label]:text-is("Connected")');
    assert(
      (await page.textContent('[data-testid=status-detail]')) === ' — using HTTP streaming',
      'the status bar says it uses HTTP streaming',
    );
    await watchStates(page);
    // A streamed reply, delta by delta, through the proxy.
    await watchPartials(page);
    const expectReply = async (m) =>
      page.waitForSelector(`.msg.bot[data-status=received] .body > p:text-is("Streaming reply to: ${m}")`, { timeout: 20_000 });
    await sendMessage(page, 'one');
    await expectReply('one');
    const partials = (await page.evaluate(() => window.__partials)).map((p) => p.trim()).filter(Boolean);
    assert(partials.length >= 3 && partials[0] === 'Stream', `the reply grew delta by delta: ${JSON.stringify(partials)}`);
    // Server restarts, graceful and not: a message typed while it is down goes out once after.
    for (const [signal, typed] of [
      ['SIGTERM', 'two (typed while stopped)'],
      ['SIGKILL', 'three (typed while killed)'],
    ]) {
      await srv.kill(signal);
      await page.waitForFunction(() => ['reconnecting', 'backend_unavailable'].includes(window.chatWebSocketService.state.kind), null, {
        timeout: 10_000,
      });
      await sendMessage(page, typed);
      await page.waitForSelector(`.msg.user[data-status=pending] .body:text-is("${typed}")`);
      await srv.start();
      await waitState(page, 'open', 40_000);
      await expectReply(typed);
    }
    await sendMessage(page, 'four');
    await expectReply('four');
    const closes = ev.concat(await page.evaluate(() => JSON.parse(window.chatWebSocketService.exportFlightRecorder()).events));
    assert(
      closes.some((e) => e.type === 'close' && e.code === 1012),
      `SIGTERM came down the stream as 1012: ${JSON.stringify(closes.filter((e) => e.type === 'close'))}`,
    );
    // Nothing lost or doubled: every message once, in seq order, as the server stored them.
    const sent = ['one', 'two (typed while stopped)', 'three (typed while killed)', 'four'];
    const stored = (await api(srv.url, `/api/bots/${bot.id}/messages?limit=100`, { token: t.access_token })).messages;
    const want = sent.flatMap((m) => [m, `Streaming reply to: ${m}`]);
    assert(
      JSON.stringify(stored.map((m) => m.content)) === JSON.stringify(want),
      `stored each message once: ${JSON.stringify(stored.map((m) => [m.seq, m.content]))}`,
    );
    assert(
      stored.every((m, i) => m.seq === i + 1),
      `seqs 1..${want.length}: ${stored.map((m) => m.seq)}`,
    );
    const shown = await shownMessages(page);
    assert(
      JSON.stringify(shown.map((m) => [m.seq, m.text])) === JSON.stringify(stored.map((m) => [m.seq, m.content])),
      `shown = stored: ${JSON.stringify(shown.map((m) => [m.seq, m.text]))}`,
    );
    assert((await page.evaluate(() => sessionStorage.getItem('natter.outbox'))) === null, 'outbox empty');
    const now = await page.evaluate(() => window.chatWebSocketService.state);
    assert(now.kind === 'open' && now.transport === 'sse', `still on HTTP streaming: ${JSON.stringify(now)}`);
    // Diagnose names the blocked WebSocket, that HTTP streaming works, and what carries the chat.
    await page.click('[data-testid=diagnose]');
    await page.waitForSelector('[data-testid=diagnose-dialog][data-done=true]', { timeout: 40_000 });
    const headline = await page.textContent('[data-testid=diag-summary]');
    assert(headline === '⚠ WebSocket blocked — using HTTP streaming', `Diagnose headline: ${headline}`);
    const report = await page.evaluate(() => window.lastDiagnosticsReport);
    const status = (id) => report.steps.find((s) => s.id === id)?.status;
    assert(
      status('handshake') === 'fail' && status('sse_established') === 'ok' && status('sse_ping') === 'ok',
      `steps: ${JSON.stringify(report.steps.map((s) => [s.id, s.status]))}`,
    );
    const summary = report.summary;
    assert(
      /Upgrade/.test(summary.fix ?? '') && /proxy_set_header Upgrade \$http_upgrade/.test(summary.fix ?? ''),
      `the fix names the proxy headers: ${summary.fix}`,
    );
    const inUse = await page.textContent('[data-testid=diag-steps] li[data-step=transport]');
    assert(/HTTP streaming/.test(inUse) && /WebSocket/.test(inUse), `the transport in use and why: ${inUse}`);
  } finally {
    proxy?.close();
    hook.close();
  }
}

scenario('issue 17: behind a proxy that strips Upgrade, the app chats over HTTP streaming: streamed reply, restarts, Diagnose', () =>
  behindNoUpgradeProxy('strip'),
);
scenario('issue 17: behind a proxy that answers the upgrade with 400, the app chats over HTTP streaming', () =>
  behindNoUpgradeProxy('refuse'),
);

scenario('issue 17: on HTTP streaming, auto tries the WebSocket again and switches back once the proxy lets it through', async () => {
  const srv = await startServer();
  const proxy = await startNoUpgradeProxy(srv.port, { mode: 'strip' });
  try {
    const t = await login(srv.url, 'demo', 'demo-password');
    const botId = await demoBotId(srv, t.access_token);
    const { page } = await newPage();
    await page.goto(`${proxy.url}/#/login`);
    const chat = (text) =>
      page.evaluate(async (text) => {
        const s = window.__s;
        await s.send(text);
        const t0 = Date.now();
        while (!window.__messages.some((m) => m.role !== 'user' && m.content === text) && Date.now() - t0 < 10000)
          await new Promise((r) => setTimeout(r, 50));
        return { state: s.state, info: s.transportInfo };
      }, text);
    const first = await page.evaluate(
      async ({ botId, token }) => {
        // A background probe every 1.5 s (doubling) rather than every 5 minutes.
        const s = new window.natter.ChatSocket({ storage: null, getToken: () => token, websocketRetryMs: 1500 });
        window.__s = s;
        window.__messages = [];
        window.__acks = [];
        s.on('message', (m) => window.__messages.push(m));
        s.on('ack', (a) => window.__acks.push(a.message));
        s.connect(botId);
        const t0 = Date.now();
        while (s.state.kind !== 'open' && Date.now() - t0 < 15000) await new Promise((r) => setTimeout(r, 50));
        return { state: s.state, info: s.transportInfo };
      },
      { botId, token: t.access_token },
    );
    assert(first.state.transport === 'sse' && first.info.why === 'preflight_ok', `on HTTP streaming: ${JSON.stringify(first)}`);
    await chat('over sse');
    // The first probe fails (the proxy still strips Upgrade); then the network is fixed.
    await page.waitForFunction(() => JSON.parse(window.__s.exportFlightRecorder()).events.some((e) => e.type === 'ws_probe' && !e.ok));
    assert((await page.evaluate(() => window.__s.state.transport)) === 'sse', 'still on HTTP streaming after a failed probe');
    proxy.setMode('pass');
    await page.waitForFunction(() => window.__s.state.kind === 'open' && window.__s.state.transport === 'websocket', null, {
      timeout: 20_000,
    });
    const back = await chat('over the websocket');
    assert(back.info.transport === 'websocket' && back.info.why === null, `back on the WebSocket: ${JSON.stringify(back)}`);
    const r = await page.evaluate(() => ({
      messages: window.__messages.map((m) => [m.seq, m.content]),
      acks: window.__acks.map((m) => [m.seq, m.content]),
      switches: JSON.parse(window.__s.exportFlightRecorder())
        .events.filter((e) => e.type === 'transport_switch')
        .map((e) => `${e.to}:${e.why}`),
    }));
    assert(r.switches.join() === 'sse:preflight_ok,websocket:probe_ok', `switched there and back: ${r.switches}`);
    const stored = (await api(srv.url, `/api/bots/${botId}/messages?limit=100`, { token: t.access_token })).messages;
    const want = ['over sse', 'over sse', 'over the websocket', 'over the websocket'];
    assert(
      JSON.stringify(stored.map((m) => m.content)) === JSON.stringify(want) && stored.every((m, i) => m.seq === i + 1),
      `each message stored once, in order: ${JSON.stringify(stored.map((m) => [m.seq, m.content]))}`,
    );
    // Over SSE your own message also comes down the stream; over the WebSocket only its ack does.
    const seqs = r.messages.map(([seq]) => seq);
    assert(
      seqs.every((q, i) => i === 0 || q > seqs[i - 1]),
      `no message event twice, in seq order: ${JSON.stringify(r.messages)}`,
    );
    const seen = new Map([...r.acks, ...r.messages]);
    assert(
      JSON.stringify([...seen].sort((a, b) => a[0] - b[0])) === JSON.stringify(stored.map((m) => [m.seq, m.content])),
      `the app saw every stored message: ${JSON.stringify(r)}`,
    );
    assert(r.acks.map(([, c]) => c).join() === 'over sse,over the websocket', `one ack per message: ${JSON.stringify(r.acks)}`);
    await page.evaluate(() => window.__s.destroy());
  } finally {
    proxy.close();
  }
});

scenario('a refused message shows Not sent with the reason, Retry and Discard', async () => {
  const srv = await startServer({ args: ['--max-content-chars', '20'] });
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { page } = await newPage();
  await loginPage(page, srv, t, 'demo');
  await page.goto(`${srv.url}/#/chat/${botId}`);
  await waitState(page, 'open');
  await sendMessage(page, 'this message is longer than twenty characters');
  await page.waitForSelector('.msg.user[data-status=failed] .msg-error:text("the limit is 20")');
  await page.click('.msg.user[data-status=failed] [data-testid=msg-retry]');
  await page.waitForSelector('.msg.user[data-status=failed] .msg-error:text("the limit is 20")');
  await page.click('.msg.user[data-status=failed] button:text("Discard")');
  await sendMessage(page, 'short one');
  await page.waitForSelector('.msg.bot .body > p:text-is("short one")');
  const shown = await shownMessages(page);
  assert(shown.length === 2 && shown.every((m) => m.status !== 'failed'), `failed one discarded: ${JSON.stringify(shown)}`);
  assert((await page.evaluate(() => window.chatWebSocketService.state.kind)) === 'open', 'the socket stayed up');
});

scenario('logging out drops unsent messages: they never go out as the next user', async () => {
  const srv = await startServer();
  const demo = await login(srv.url, 'demo', 'demo-password');
  const pub = await api(srv.url, '/api/bots', {
    method: 'POST',
    token: demo.access_token,
    body: { name: 'Lobby', visibility: 'public', engine: { kind: 'echo' } },
  });
  await api(srv.url, '/api/auth/register', { method: 'POST', body: { username: 'bob', password: 'bob-password' } });
  const { ctx, page } = await newPage();
  await loginPage(page, srv, demo, 'demo');
  await page.goto(`${srv.url}/#/chat/${pub.id}`);
  await waitState(page, 'open');
  await ctx.setOffline(true);
  await waitState(page, 'offline');
  await sendMessage(page, 'queued by demo');
  await page.waitForSelector('.msg.user[data-status=pending]');
  await page.click('[data-testid=logout]');
  await page.waitForSelector('[data-testid=auth-submit]');
  await ctx.setOffline(false);
  await page.fill('[data-testid=username]', 'bob');
  await page.fill('[data-testid=password]', 'bob-password');
  await page.click('[data-testid=auth-submit]');
  await page.waitForSelector('[data-testid=chat-link]');
  await page.goto(`${srv.url}/#/chat/${pub.id}`);
  await waitState(page, 'open');
  await sleep(1000);
  const bob = await login(srv.url, 'bob', 'bob-password');
  const bobs = await api(srv.url, `/api/bots/${pub.id}/messages`, { token: bob.access_token });
  assert(
    bobs.messages.every((m) => m.content !== 'queued by demo'),
    `nothing sent as bob: ${JSON.stringify(bobs.messages)}`,
  );
  assert((await shownMessages(page)).length === 0, 'bob sees an empty conversation');
});

scenario('revoke access: Failed with a readable reason, no retry loop', async () => {
  const srv = await startServer();
  const owner = await login(srv.url, 'demo', 'demo-password');
  const bot = await api(srv.url, '/api/bots', {
    method: 'POST',
    token: owner.access_token,
    body: { name: 'Secret', visibility: 'private', engine: { kind: 'echo' } },
  });
  const guest = await registerAndLogin(srv.url, 'guest');
  await api(srv.url, `/api/bots/${bot.id}/members`, {
    method: 'POST',
    token: owner.access_token,
    body: { username: 'guest', role: 'chat' },
  });
  const { page } = await newPage();
  await loginPage(page, srv, guest, 'guest');
  await page.goto(`${srv.url}/#/chat/${bot.id}`);
  await waitState(page, 'open');
  await sendMessage(page, 'hi');
  await page.waitForSelector('.msg.bot .body > p:text-is("hi")');
  // The open socket is closed at once (4403), with the reason.
  await api(srv.url, `/api/bots/${bot.id}/members/guest`, { method: 'DELETE', token: owner.access_token });
  await waitState(page, 'failed', 30_000);
  const label = await page.textContent('[data-testid=status-label]');
  assert(label === "You don't have access to this bot", `plain words: ${label}`);
  assert(/access to this bot was revoked/.test(await page.textContent('[data-testid=status-tech]')), 'the reason behind Details');
  const traffic = countTraffic(page);
  await sleep(4000);
  assert(traffic.sockets.length === 0 && traffic.ticket === 0, `no retry loop: ${JSON.stringify(traffic)}`);
  // Retry tries exactly once more and is refused before any socket opens.
  await page.click('[data-testid=retry]');
  await waitState(page, 'failed');
  await sleep(1500);
  assert(traffic.ticket === 1, `Retry made one attempt (${traffic.ticket})`);
  const again = await page.textContent('[data-testid=status-tech]');
  assert(/^4403 forbidden: .*not shared with you/.test(again), `the reason on Retry: ${again}`);
});

scenario('Diagnose on a broken setup shows the failing step and copies the report', async () => {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const { ctx, page } = await newPage();
  await ctx.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: srv.url });
  await loginPage(page, srv, t, 'demo');
  await page.goto(`${srv.url}/#/chat/11111111-2222-4333-8444-555555555555`);
  await waitState(page, 'failed');
  await page.click('[data-testid=diagnose]');
  await page.waitForSelector('[data-testid=diagnose-dialog][data-done=true]', { timeout: 30_000 });
  const failing = await page.getAttribute('[data-testid=diag-steps] li[data-status=fail]', 'data-step');
  assert(failing === 'bot', `first failing step is bot: ${failing}`);
  const text = await page.textContent('[data-testid=diag-steps] li[data-step=bot]');
  assert(text.includes('✗') && /No bot has the id/.test(text) && /Fix:/.test(text), `shows ✗, explanation and fix: ${text}`);
  const okText = await page.textContent('[data-testid=diag-steps] li[data-step=api]');
  assert(okText.includes('✓'), 'api step ✓');
  await page.click('[data-testid=copy-report]');
  await page.waitForSelector('.copied:text("Copied")');
  const clip = await page.evaluate(() => navigator.clipboard.readText());
  assert(
    clip.includes('✗ Bot exists and is allowed') && clip.includes('flight recorder') && !clip.includes(t.access_token),
    'copied report has steps and no token',
  );
});

scenario('two tabs on the same conversation stay in step', async () => {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { ctx, page: a } = await newPage();
  await loginPage(a, srv, t, 'demo');
  await a.goto(`${srv.url}/#/chat/${botId}`);
  const b = await ctx.newPage();
  await b.goto(`${srv.url}/#/chat/${botId}`);
  await waitState(a, 'open');
  await waitState(b, 'open');
  await sendMessage(a, 'from tab A');
  await b.waitForSelector('.msg.user .body:text-is("from tab A")');
  await b.waitForSelector('.msg.bot .body > p:text-is("from tab A")');
  await sendMessage(b, 'from tab B');
  await a.waitForSelector('.msg.bot .body > p:text-is("from tab B")');
  await b.waitForSelector('.msg.bot .body > p:text-is("from tab B")');
  await sleep(300);
  const sa = (await shownMessages(a)).map((m) => `${m.seq}:${m.role}:${m.text}`);
  const sb = (await shownMessages(b)).map((m) => `${m.seq}:${m.role}:${m.text}`);
  assert(JSON.stringify(sa) === JSON.stringify(sb), `same transcript:\n${sa.join('\n')}\nvs\n${sb.join('\n')}`);
  assert(sa.length === 4, `four messages: ${sa}`);
});

scenario('two tabs with an expired token refresh once between them (rotating refresh tokens)', async () => {
  const srv = await startServer({ args: ['--access-token-ttl-secs', '1'] });
  const t = await login(srv.url, 'demo', 'demo-password');
  const { ctx, page: a } = await newPage();
  await loginPage(a, srv, t, 'demo');
  const b = await ctx.newPage();
  await Promise.all([a.goto(`${srv.url}/#/bots`), b.goto(`${srv.url}/#/bots`)]);
  await a.waitForSelector('[data-testid=chat-link]');
  await sleep(7000); // expired, beyond the server's 5 s leeway
  let refreshes = 0;
  ctx.on('request', (r) => r.url().endsWith('/api/auth/refresh') && refreshes++);
  await Promise.all([a.reload(), b.reload()]);
  await Promise.all([a.waitForSelector('[data-testid=chat-link]'), b.waitForSelector('[data-testid=chat-link]')]);
  assert(refreshes === 1, `one refresh for both tabs, got ${refreshes}`);
  // Both tabs go on working with the new pair (a reused refresh token would have revoked it).
  const rt = await a.evaluate(() => localStorage.getItem('refresh_token'));
  const again = await api(srv.url, '/api/auth/refresh', { method: 'POST', body: { refresh_token: rt } });
  assert(again.access_token, 'the stored refresh token is still good');
});

scenario('keyboard only: log in, open a chat, send, open Diagnose', async () => {
  const srv = await startServer();
  const { page } = await newPage();
  await page.goto(`${srv.url}/#/login`);
  await page.waitForSelector('[data-testid=username]:focus');
  await page.keyboard.type('demo');
  await page.keyboard.press('Tab');
  await page.keyboard.type('demo-password');
  await page.keyboard.press('Enter');
  await page.waitForSelector('[data-testid=chat-link]');
  const tabTo = async (pred, what) => {
    for (let i = 0; i < 30; i++) {
      await page.keyboard.press('Tab');
      if (await page.evaluate(pred)) return;
    }
    throw new Error(`could not Tab to ${what}`);
  };
  await tabTo(() => document.activeElement?.textContent === 'Echo', 'the Echo link');
  await page.keyboard.press('Enter');
  await waitState(page, 'open');
  await page.waitForSelector('[data-testid=composer]:focus');
  await page.keyboard.type('typed with keys');
  await page.keyboard.press('Enter');
  await page.waitForSelector('.msg.bot .body > p:text-is("typed with keys")');
  await tabTo(() => document.activeElement?.dataset.testid === 'diagnose', 'Diagnose');
  await page.keyboard.press('Enter');
  await page.waitForSelector('[data-testid=diagnose-dialog][data-done=true]', { timeout: 30_000 });
  await page.keyboard.press('Escape');
  await page.waitForSelector('[data-testid=diagnose-dialog]', { state: 'detached' });
});

scenario('history: older messages load on scroll up', async () => {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { page } = await newPage();
  await loginPage(page, srv, t, 'demo');
  // 60 messages → 120 stored with the replies: more than one page of 50.
  await page.goto(`${srv.url}/#/chat/${botId}`);
  await waitState(page, 'open');
  await page.evaluate(async () => {
    for (let i = 1; i <= 60; i++) {
      await window.chatWebSocketService.send(`m${i}`);
      await new Promise((r) => setTimeout(r, 210)); // within 5 messages/s
    }
  });
  await page.waitForSelector('.msg.bot .body > p:text-is("m60")');
  await page.reload();
  await waitState(page, 'open');
  let shown = await shownMessages(page);
  assert(shown.length === 50 && shown[0].seq === 71 && shown.at(-1).seq === 120, `latest page: ${shown.length} from ${shown[0]?.seq}`);
  await page.$eval('[data-testid=messages]', (el) => (el.scrollTop = 0));
  await page.waitForFunction(() => document.querySelectorAll('[data-testid=messages] .msg').length === 100);
  await page.$eval('[data-testid=messages]', (el) => (el.scrollTop = 0));
  await page.waitForFunction(() => document.querySelectorAll('[data-testid=messages] .msg').length === 120);
  shown = await shownMessages(page);
  assert(
    shown.every((m, i) => m.seq === i + 1),
    'all 120 in order, none twice',
  );
});

// ---- issue 18: plain words, a chat that heals, Markdown replies, early refresh, hidden tabs ----

const SNAKE = /\b[a-z]+_[a-z_]+\b/;
const CODE_NUMBER = /\b[14]\d{3}\b/;

/** Records every status label and tone shown, and whether the tab was hidden at the time. */
async function watchStatus(page) {
  await page.evaluate(() => {
    window.__shown = [];
    const bar = document.querySelector('[data-testid=status]');
    const note = () => {
      const e = {
        label: bar.querySelector('[data-testid=status-label]').textContent,
        detail: bar.querySelector('[data-testid=status-detail]').textContent,
        tone: bar.dataset.tone,
        hidden: document.visibilityState === 'hidden',
        state: window.chatWebSocketService.state.kind,
      };
      const last = window.__shown.at(-1);
      if (!last || last.label !== e.label || last.tone !== e.tone || last.hidden !== e.hidden) window.__shown.push(e);
    };
    new MutationObserver(note).observe(bar, { attributes: true, childList: true, characterData: true, subtree: true });
    document.addEventListener('visibilitychange', note);
    note();
  });
}

/** Hides or shows the tab as a phone does when another app comes to the front. */
async function setHidden(page, hidden) {
  await page.evaluate((hidden) => {
    if (!window.__visibilityPatched) {
      window.__visibilityPatched = true;
      Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => (window.__hidden ? 'hidden' : 'visible') });
      Object.defineProperty(document, 'hidden', { configurable: true, get: () => !!window.__hidden });
    }
    window.__hidden = hidden;
    document.dispatchEvent(new Event('visibilitychange'));
  }, hidden);
}

/** A demo server and a page logged in as demo, open on the Echo bot's chat. */
async function openDemoChat(pageOpts = {}) {
  const srv = await startServer();
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { ctx, page } = await newPage(pageOpts);
  await loginPage(page, srv, t, 'demo');
  await page.goto(`${srv.url}/#/chat/${botId}`);
  await waitState(page, 'open');
  return { srv, t, botId, ctx, page };
}

scenario('issue 18: the status bar speaks plain words for every close code; details one click away', async () => {
  const { srv, page } = await openDemoChat();
  await watchStatus(page);
  // Restarting, then down.
  await srv.kill('SIGTERM');
  await page.waitForSelector(`[data-testid=status-label]:text-matches("^Can't reach the server — retrying")`, { timeout: 20_000 });
  const shown = await page.evaluate(() => window.__shown);
  assert(
    shown.some((s) => /^The server is restarting — reconnecting/.test(s.label)),
    `said the server is restarting: ${JSON.stringify(shown)}`,
  );
  for (const s of shown)
    assert(
      !SNAKE.test(s.label + s.detail) && !CODE_NUMBER.test(s.label + s.detail) && !/fetch/i.test(s.label + s.detail),
      `plain words: ${JSON.stringify(s)}`,
    );
  assert(!(await page.isVisible('[data-testid=status-tech]')), 'details hidden until asked for');
  await page.click('[data-testid=status-more]');
  const tech = await page.textContent('[data-testid=status-tech]');
  assert(/server unreachable/.test(tech) && /attempt \d/.test(tech), `the technical words one click away: ${tech}`);
  assert((await page.getAttribute('[data-testid=status]', 'title')).includes('server unreachable'), 'and on hover');
  const recorded = await page.evaluate(() =>
    JSON.parse(window.chatWebSocketService.exportFlightRecorder()).events.filter((e) => e.type === 'close'),
  );
  assert(
    recorded[0].code === 1012 && recorded[0].name === 'server_restarting' && recorded[0].said === 'The server is restarting',
    `the flight recorder has the code, its name and the words: ${JSON.stringify(recorded[0])}`,
  );
  // Diagnose: a sentence, not a URL.
  await page.click('[data-testid=diagnose]');
  await page.waitForSelector('[data-testid=diagnose-dialog][data-done=true]', { timeout: 30_000 });
  const headline = await page.textContent('[data-testid=diag-summary]');
  assert(/^✗ Can't reach the server/.test(headline) && !/http|fetch|\/api\//i.test(headline), `Diagnose headline: ${headline}`);
  await page.keyboard.press('Escape');
  await srv.start();
  await waitState(page, 'open', 40_000);

  // Every close code of the server's registry, and the client's own, through the real status bar.
  const registry = await api(srv.url, '/api/ws/codes');
  const codes = [...registry.close_codes.map((c) => c.code), 1005, 1006, 4000, 4001, 4003];
  await page.evaluate(() => {
    // WebSocket only: the 1006 below, with a preflight that is ok, would rightly make `auto`
    // switch to HTTP streaming (issue 17), and the codes after it would never reach the socket.
    window.chatWebSocketService.configure({ transport: 'websocket' });
    window.__RealWebSocket = window.WebSocket;
    // A socket whose server refuses with the code under test.
    window.WebSocket = class {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        this.bufferedAmount = 0;
        setTimeout(() => {
          this.readyState = 3;
          this.onclose?.({ code: window.__closeWith, reason: `refused for the test (${window.__closeWith})` });
        }, 20);
      }
      send() {}
      close() {
        this.readyState = 3;
      }
    };
  });
  for (const code of codes) {
    await page.evaluate((code) => {
      window.__closeWith = code;
      window.chatWebSocketService.retryNow();
    }, code);
    await page.waitForFunction(
      (code) => {
        const s = window.chatWebSocketService.state;
        return (
          (s.kind === 'failed' && s.code === code) ||
          (s.kind === 'reconnecting' && s.lastClose?.code === code) ||
          (code === 4401 && s.kind === 'failed')
        );
      },
      code,
      { timeout: 15_000 },
    );
    const label = await page.textContent('[data-testid=status-label]');
    const detail = await page.textContent('[data-testid=status-detail]');
    assert(
      label.length > 5 && !SNAKE.test(label + detail) && !CODE_NUMBER.test(label + detail),
      `${code}: plain words in the headline: ${label}${detail}`,
    );
    if (!(await page.isVisible('[data-testid=status-tech]'))) await page.click('[data-testid=status-more]');
    const tech = await page.textContent('[data-testid=status-tech]');
    const name =
      code === 1005
        ? 'no_status'
        : code === 1006
          ? 'abnormal_closure'
          : code >= 4000 && code < 4100
            ? ''
            : registry.close_codes.find((c) => c.code === code).name;
    assert(tech.startsWith(`${code} ${name}`), `${code}: the code and its name behind Details: ${tech}`);
  }
  await page.evaluate(() => {
    window.WebSocket = window.__RealWebSocket;
    window.chatWebSocketService.configure({ transport: 'auto' });
    window.chatWebSocketService.retryNow();
  });
  await waitState(page, 'open');
});

scenario('issue 18: a chat opened while the server is down heals itself when it returns', async () => {
  const { srv, botId, page } = await openDemoChat();
  for (const m of ['one', 'two', 'three']) {
    await sendMessage(page, m);
    await page.waitForSelector(`.msg.bot .body > p:text-is("${m}")`);
  }
  await srv.kill();
  await page.evaluate(() => (window.__sameDocument = true));
  await page.click('a.back');
  await page.waitForSelector('main');
  await page.evaluate((id) => (location.hash = `#/chat/${id}`), botId);
  await page.waitForSelector('[data-testid=chat-error]:not(:empty)', { timeout: 15_000 });
  const notice = await page.textContent('[data-testid=chat-error]');
  assert(!/fetch/i.test(notice) && /server/.test(notice), `the notice is in plain words: ${notice}`);
  await sleep(1000);
  await srv.start();
  await waitState(page, 'open', 40_000);
  await page.waitForFunction(() => document.querySelectorAll('[data-testid=messages] .msg').length === 6, null, { timeout: 15_000 });
  await page.waitForSelector('[data-testid=chat-title]:text-is("Echo")');
  await page.waitForSelector('[data-testid=chat-error]:empty', { state: 'attached' });
  const shown = await shownMessages(page);
  assert(
    shown.map((m) => m.seq).join() === '1,2,3,4,5,6' && shown.map((m) => m.text).join() === 'one,one,two,two,three,three',
    `history in order, once: ${JSON.stringify(shown)}`,
  );
  assert(await page.evaluate(() => window.__sameDocument === true), 'healed without a reload');
  // And it goes on as usual.
  await sendMessage(page, 'four');
  await page.waitForSelector('.msg.bot .body > p:text-is("four")');
  assert((await shownMessages(page)).length === 8, 'eight messages');
});

scenario('issue 18: bot replies are Markdown, sanitised; hostile input executes nothing; user text stays plain', async () => {
  const { srv, ctx, page } = await openDemoChat();
  await ctx.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: srv.url });
  const dialogs = [];
  page.on('dialog', (d) => {
    dialogs.push(d.message());
    void d.dismiss();
  });
  const popups = [];
  ctx.on('page', (p) => popups.push(p.url()));
  const hostile = [
    '# Plan',
    '**bold**, _em_, `inline` and a [good link](https://example.com/docs).',
    '',
    '- [js](javascript:window.__xss=1) [JS](JaVaScRiPt:alert(2)) [ent](&#106;avascript:window.__xss=3) [data](data:text/html,<script>window.__xss=4</script>)',
    '- <img src=x onerror="window.__xss=5"> <svg onload="window.__xss=6"></svg> <iframe src="javascript:window.__xss=7"></iframe>',
    '- <script>window.__xss=8</script><a href="javascript:window.__xss=9">raw link</a> <b onmouseover="window.__xss=10">raw bold</b>',
    '- ![pic](x" onerror="window.__xss=11) <details open ontoggle="window.__xss=12">x</details> <style>body{display:none}</style>',
    '',
    '| plan | price |',
    '|------|-------|',
    '| free | 0 |',
    '',
    '```js',
    'const x = "<b>not bold</b>";',
    'console.log(x);',
    '```',
  ].join('\n');
  await sendMessage(page, hostile);
  await page.waitForSelector('.msg.bot[data-status=received] .body table', { timeout: 10_000 });
  await sleep(300);
  const bot = page.locator('.msg.bot .body').last();
  const report = await bot.evaluate((b) => ({
    h1: b.querySelector('h1')?.textContent,
    strong: b.querySelector('strong')?.textContent,
    em: !!b.querySelector('em'),
    li: b.querySelectorAll('li').length,
    th: [...b.querySelectorAll('th')].map((e) => e.textContent),
    code: b.querySelector('pre code')?.textContent,
    copyButtons: b.querySelectorAll('pre + button, .code-block button').length,
    scripts: b.querySelectorAll('script, iframe, svg, style, object, embed, form, img').length,
    onAttrs: [...b.querySelectorAll('*')].flatMap((e) => [...e.attributes].map((a) => a.name)).filter((n) => n.startsWith('on')),
    links: [...b.querySelectorAll('a')].map((a) => ({ href: a.getAttribute('href'), target: a.target, rel: a.rel, text: a.textContent })),
    rawBold: b.textContent.includes('raw bold'),
  }));
  assert(report.h1 === 'Plan' && report.strong === 'bold' && report.em && report.li >= 4, `Markdown rendered: ${JSON.stringify(report)}`);
  assert(report.th.join() === 'plan,price', `a table: ${JSON.stringify(report.th)}`);
  assert(
    report.code === 'const x = "<b>not bold</b>";\nconsole.log(x);\n' || report.code === 'const x = "<b>not bold</b>";\nconsole.log(x);',
    `code kept as text: ${JSON.stringify(report.code)}`,
  );
  assert(report.copyButtons === 1, `a copy button on the code block: ${report.copyButtons}`);
  assert(report.scripts === 0 && report.onAttrs.length === 0, `no active content: ${JSON.stringify(report)}`);
  for (const l of report.links) {
    assert(!/^\s*(javascript|data|vbscript):/i.test(l.href ?? ''), `no dangerous link: ${JSON.stringify(l)}`);
    if (l.href)
      assert(l.target === '_blank' && /noopener/.test(l.rel) && /noreferrer/.test(l.rel), `links open safely: ${JSON.stringify(l)}`);
  }
  assert(
    report.links.some((l) => l.href === 'https://example.com/docs'),
    `the good link kept: ${JSON.stringify(report.links)}`,
  );
  // Click everything that is a link or could be one; hover the raw bold.
  for (const a of await bot.locator('a:not([href^="http"])').all()) await a.click({ timeout: 2000 }).catch(() => {});
  await bot.hover();
  await sleep(500);
  const xss = await page.evaluate(() => window.__xss);
  assert(xss === undefined && dialogs.length === 0, `nothing executed: __xss=${xss}, dialogs=${JSON.stringify(dialogs)}`);
  assert(
    popups.every((u) => !/^(javascript|data):/i.test(u)),
    `no script popups: ${JSON.stringify(popups)}`,
  );
  assert(await page.isVisible('.messages'), 'the page is not hidden by injected style');
  // The user's own message is plain text, exactly as typed.
  const mine = await page
    .locator('.msg.user .body')
    .last()
    .evaluate((b) => ({ text: b.textContent, elements: b.children.length }));
  assert(mine.text === hostile && mine.elements === 0, `user text stays plain: ${JSON.stringify(mine).slice(0, 200)}`);
  // Copy the code.
  await bot.locator('[data-testid=copy-code]').click();
  await page.waitForSelector('[data-testid=copy-code]:text("Copied")');
  const clip = await page.evaluate(() => navigator.clipboard.readText());
  assert(clip.trimEnd() === 'const x = "<b>not bold</b>";\nconsole.log(x);', `copied the code: ${JSON.stringify(clip)}`);
});

scenario('issue 18: a streamed Markdown reply re-renders only itself, at most once a frame', async () => {
  const pieces = ['Here is **a list', '**:\n\n', ...Array.from({ length: 120 }, (_, i) => `- item ${i}\n`), '\n```\ncode()\n```\n'];
  const { page, close } = await streamingBot('Lister', () => pieces, 4);
  try {
    // Some history first, which must not be touched while the reply streams.
    await page.evaluate(() => {
      window.__deltas = 0;
      window.chatWebSocketService.on('delta', () => window.__deltas++);
    });
    await sendMessage(page, 'first');
    await page.waitForSelector('.msg.bot[data-status=received] pre', { timeout: 15_000 });
    await page.evaluate(() => {
      window.__deltas = 0;
      window.__frames = 0;
      window.__renders = 0;
      window.__foreign = [];
      window.__sawMarkdownWhileStreaming = false;
      window.__kept = [...document.querySelectorAll('[data-testid=messages] .msg .body')].map((b) => [b, b.firstChild]);
      const tick = () => {
        window.__frames++;
        if (!window.__stopFrames) requestAnimationFrame(tick);
      };
      requestAnimationFrame(tick);
      new MutationObserver((records) => {
        for (const r of records) {
          const row = document.querySelector('.msg.bot[data-status=streaming]');
          if (!row) continue;
          if (row.contains(r.target)) {
            if (r.target === row.querySelector('.body') && r.type === 'childList') window.__renders++;
            if (row.querySelector('.body strong')) window.__sawMarkdownWhileStreaming = true;
          } else if (!(r.target.matches?.('[data-testid=messages]') && [...r.addedNodes, ...r.removedNodes].every((n) => n === row))) {
            window.__foreign.push(r.target.outerHTML?.slice(0, 80) ?? String(r.target.nodeName));
          }
        }
      }).observe(document.querySelector('[data-testid=messages]'), {
        childList: true,
        subtree: true,
        characterData: true,
        attributes: true,
      });
    });
    await sendMessage(page, 'second');
    await page.waitForSelector('.msg.bot[data-status=streaming]', { timeout: 15_000 });
    await page.evaluate(() => {
      // Own message rows settle (ack) before the reply starts; from here only the reply may change.
      window.__foreign = [];
    });
    await page.waitForFunction(() => document.querySelectorAll('.msg.bot[data-status=received]').length === 2, null, { timeout: 20_000 });
    const r = await page.evaluate(() => {
      window.__stopFrames = true;
      return {
        deltas: window.__deltas,
        frames: window.__frames,
        renders: window.__renders,
        foreign: window.__foreign,
        markdown: window.__sawMarkdownWhileStreaming,
        kept: window.__kept.every(([b, first]) => b.isConnected && b.firstChild === first),
      };
    });
    assert(r.markdown, 'the reply is Markdown while it streams');
    assert(r.kept, 'earlier messages were not re-rendered');
    assert(r.foreign.length === 0, `nothing but the streaming reply changed: ${JSON.stringify(r.foreign.slice(0, 5))}`);
    assert(r.renders >= 2 && r.renders <= r.frames + 1 && r.renders <= r.deltas, `renders throttled to frames: ${JSON.stringify(r)}`);
    const items = await page
      .locator('.msg.bot .body')
      .last()
      .evaluate((b) => b.querySelectorAll('li').length);
    assert(items === 120, `the whole list at the end: ${items}`);
  } finally {
    close();
  }
});

scenario('issue 18: the access token is refreshed before it expires, once for all tabs; no 4401 round trip', async () => {
  const srv = await startServer({ args: ['--access-token-ttl-secs', '12'] });
  const t0 = Date.now();
  const t = await login(srv.url, 'demo', 'demo-password');
  const botId = await demoBotId(srv, t.access_token);
  const { ctx, page: a } = await newPage();
  let refreshes = 0;
  const refused = [];
  ctx.on('request', (r) => r.url().endsWith('/api/auth/refresh') && refreshes++);
  ctx.on('response', (r) => r.status() === 401 && refused.push(r.url()));
  await loginPage(a, srv, t, 'demo');
  await a.goto(`${srv.url}/#/chat/${botId}`);
  await a.reload(); // as a tab opened when logged in (loginPage only wrote the tokens)
  const b = await ctx.newPage();
  await b.goto(`${srv.url}/#/chat/${botId}`);
  await waitState(a, 'open');
  await waitState(b, 'open');
  await sleep(t0 + 11_000 - Date.now());
  assert(refreshes === 1, `one refresh before expiry, shared by both tabs: ${refreshes}`);
  const fresh = await a.evaluate(() => localStorage.getItem('access_token'));
  assert(fresh && fresh !== t.access_token, 'a new access token');
  // Past the first token's end (12 s + the server's 5 s leeway): reconnect both tabs.
  await sleep(t0 + 19_000 - Date.now());
  for (const p of [a, b]) await p.evaluate(() => window.chatWebSocketService.retryNow());
  for (const p of [a, b]) {
    await waitState(p, 'open').catch(async (e) => {
      console.log(await p.evaluate(() => [location.hash, window.chatWebSocketService.exportFlightRecorder()]));
      throw e;
    });
  }
  await sendMessage(a, 'still here');
  await b.waitForSelector('.msg.bot .body > p:text-is("still here")');
  for (const p of [a, b]) {
    const ev = await p.evaluate(() => JSON.parse(window.chatWebSocketService.exportFlightRecorder()).events);
    assert(
      !ev.some((e) => (e.type === 'close' && e.code === 4401) || e.type === 'reauth'),
      `no 4401 round trip: ${JSON.stringify(ev.filter((e) => e.type === 'close' || e.type === 'reauth'))}`,
    );
  }
  assert(refused.length === 0, `no request was refused: ${JSON.stringify(refused)}`);
  assert(refreshes >= 1 && refreshes <= 2, `a refresh per lifetime, not per tab: ${refreshes}`);
});

scenario(
  'issue 18: phone width, hidden tab: no error flashes, retries back off, shown again it reconnects at once and catches up',
  async () => {
    const srv = await startServer();
    const t = await login(srv.url, 'demo', 'demo-password');
    const botId = await demoBotId(srv, t.access_token);
    const { ctx, page } = await newPage({ viewport: { width: 375, height: 740 }, isMobile: true, hasTouch: true });
    // Backoff delays near their ceiling, so the wait after a few tries is long enough to see.
    await page.addInitScript(() => (Math.random = () => 0.99));
    await loginPage(page, srv, t, 'demo');
    await page.goto(`${srv.url}/#/chat/${botId}`);
    await waitState(page, 'open');
    await sendMessage(page, 'before');
    await page.waitForSelector('.msg.bot .body > p:text-is("before")');
    const other = await ctx.newPage();
    await other.setViewportSize({ width: 1000, height: 760 });
    await other.goto(`${srv.url}/#/chat/${botId}`);
    await waitState(other, 'open');
    await watchStatus(page);
    await setHidden(page, true);
    await srv.kill();
    // Wait until the hidden tab's next try is far off.
    const handle = await page.waitForFunction(
      () => {
        const s = window.chatWebSocketService.state;
        return (s.kind === 'reconnecting' || s.kind === 'backend_unavailable') && s.retryAt - Date.now() > 6000 ? s.retryAt : false;
      },
      null,
      { timeout: 40_000, polling: 100 },
    );
    const retryAt = await handle.jsonValue();
    const ev = await page.evaluate(() => JSON.parse(window.chatWebSocketService.exportFlightRecorder()).events);
    const waits = ev
      .filter((e) => e.type === 'state' && (e.to === 'reconnecting' || e.to === 'backend_unavailable'))
      .map((e) => ({ attempt: e.attempt, ms: e.retryAt - e.t }));
    assert(
      waits.length >= 3 && waits.every((w, i) => w.attempt === i + 1 && w.ms <= 500 * 2 ** (w.attempt - 1)),
      `hidden, the retries follow the backoff: ${JSON.stringify(waits)}`,
    );
    // The server is back and the conversation moves on without this tab.
    await srv.start();
    await other.evaluate(() => window.chatWebSocketService.retryNow());
    await waitState(other, 'open');
    await sendMessage(other, 'while you were away');
    await other.waitForSelector('.msg.bot .body > p:text-is("while you were away")');
    const shownAt = Date.now();
    assert(retryAt - shownAt > 1500, `the hidden tab's next try is still ahead (${retryAt - shownAt} ms)`);
    await setHidden(page, false);
    await waitState(page, 'open', 10_000);
    const took = Date.now() - shownAt;
    assert(
      took < Math.min(3000, retryAt - shownAt),
      `shown again, it reconnected at once (${took} ms; the backoff said ${retryAt - shownAt} ms)`,
    );
    await page.waitForSelector('.msg.bot .body > p:text-is("while you were away")', { timeout: 5000 });
    const texts = (await shownMessages(page)).map((m) => m.text);
    assert(texts.join() === 'before,before,while you were away,while you were away', `caught up, nothing doubled: ${texts}`);
    const shown = await page.evaluate(() => window.__shown);
    const hiddenBad = shown.filter((s) => s.hidden && s.tone === 'bad');
    assert(hiddenBad.length === 0, `no error state while hidden: ${JSON.stringify(hiddenBad)}`);
    const afterShown = shown.slice(shown.findLastIndex((s) => s.hidden) + 1);
    assert(
      afterShown.every((s) => s.tone !== 'bad'),
      `no error flash on the way back: ${JSON.stringify(afterShown)}`,
    );
    assert(await page.evaluate(() => document.documentElement.scrollWidth <= 375), 'nothing wider than the phone');
  },
);

// ---- runner -----------------------------------------------------------------------------

async function main() {
  const missing = checkPrerequisites();
  if (missing.length) {
    console.error(`missing: ${missing.join('; ')}`);
    console.log('0 passed, 1 failed');
    process.exit(1);
  }
  browser = await launchBrowser();
  let passed = 0;
  let failed = 0;
  const started = Date.now();
  for (const s of scenarios) {
    if (filter && !s.name.includes(filter)) continue;
    const t0 = Date.now();
    let timer;
    try {
      await Promise.race([
        s.fn(),
        new Promise((_, rej) => {
          timer = setTimeout(() => rej(new Error(`timed out after ${SCENARIO_TIMEOUT_MS} ms`)), SCENARIO_TIMEOUT_MS);
        }),
      ]);
      passed++;
      console.log(`✓ ${s.name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    } catch (e) {
      failed++;
      console.log(
        `✗ ${s.name} (${((Date.now() - t0) / 1000).toFixed(1)} s)\n    ${String(e?.stack ?? e)
          .split('\n')
          .slice(0, 6)
          .join('\n    ')}`,
      );
    } finally {
      clearTimeout(timer);
      for (const ctx of browser.contexts()) await ctx.close().catch(() => {});
      await stopAll();
    }
  }
  await browser.close();
  console.log(`browser tests took ${((Date.now() - started) / 1000).toFixed(1)} s`);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch(async (e) => {
  console.error(e);
  await stopAll();
  console.log('0 passed, 1 failed');
  process.exit(1);
});
