// Test harness for the browser tests: real natter servers on free ports with temp data dirs,
// Debian's chromium driven by playwright-core, and small REST helpers.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const WEB_DIR = resolve(here, '..');
export const REPO = resolve(WEB_DIR, '..');
export const DIST = join(WEB_DIR, 'dist');
export const NATTER = process.env.NATTER_BIN ?? join(REPO, 'target', 'debug', 'natter');
export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

export function checkPrerequisites() {
  const missing = [];
  if (!existsSync(join(DIST, 'index.html'))) missing.push(`${DIST}/index.html (run: npm run build)`);
  if (!existsSync(NATTER)) missing.push(`${NATTER} (run: cargo build -p natter)`);
  if (!existsSync(CHROMIUM)) missing.push(`${CHROMIUM} (run: apt-get install -y chromium)`);
  return missing;
}

export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.unref();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const servers = new Set();
const dirs = new Set();

/**
 * Starts `natter serve` (serving the web app in `webDir`) and waits until /api/health answers. `restart()` starts it again on
 * the same port and data dir (after `kill()`).
 */
export async function startServer({ demo = true, args = [], port, dataDir, webDir = DIST } = {}) {
  port ??= await freePort();
  if (!dataDir) {
    dataDir = mkdtempSync(join(tmpdir(), 'natter-e2e-'));
    dirs.add(dataDir);
  }
  const url = `http://127.0.0.1:${port}`;
  const argv = ['serve', '--bind', `127.0.0.1:${port}`, '--data-dir', dataDir, '--web-dir', webDir, ...(demo ? ['--demo'] : []), ...args];
  const srv = { url, port, dataDir, proc: null, log: [] };
  srv.start = async () => {
    const proc = spawn(NATTER, argv, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
    });
    srv.proc = proc;
    servers.add(proc);
    const keep = (d) => {
      srv.log.push(String(d));
      if (srv.log.length > 200) srv.log.shift();
    };
    proc.stdout.on('data', keep);
    proc.stderr.on('data', keep);
    proc.on('exit', () => servers.delete(proc));
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline) {
      if (proc.exitCode !== null) throw new Error(`natter exited with ${proc.exitCode}: ${srv.log.join('').slice(-2000)}`);
      try {
        const r = await fetch(`${url}/api/health`);
        if (r.ok) return;
      } catch {
        // not up yet
      }
      await sleep(100);
    }
    throw new Error(`natter did not become healthy on ${url}`);
  };
  srv.kill = async (signal = 'SIGKILL') => {
    const p = srv.proc;
    if (!p || p.exitCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await Promise.race([gone, sleep(5000)]);
  };
  srv.restart = async () => {
    await srv.kill();
    await srv.start();
  };
  await srv.start();
  return srv;
}

export async function stopAll() {
  for (const p of servers) {
    try {
      p.kill('SIGKILL');
    } catch {
      // gone
    }
  }
  servers.clear();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  dirs.clear();
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/** JSON REST call from node. */
export async function api(base, path, { method = 'GET', token, body } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = text;
  }
  if (!r.ok) {
    const e = new Error(`${method} ${path} → ${r.status} ${text.slice(0, 200)}`);
    e.status = r.status;
    e.body = json;
    throw e;
  }
  return json;
}

export async function login(base, username, password) {
  return api(base, '/api/auth/login', { method: 'POST', body: { username, password } });
}

export async function registerAndLogin(base, username, password = 'correct-horse-battery') {
  await api(base, '/api/auth/register', { method: 'POST', body: { username, password } });
  return login(base, username, password);
}

/** Logs a page in by putting tokens where the app keeps them. */
export async function loginPage(page, srv, tokens, username) {
  await page.goto(`${srv.url}/#/login`);
  await page.evaluate(
    ({ t, u }) => {
      localStorage.setItem('access_token', t.access_token);
      localStorage.setItem('refresh_token', t.refresh_token);
      localStorage.setItem('natter.user', JSON.stringify({ username: u }));
    },
    { t: tokens, u: username },
  );
}

/** Records every state the page's ChatSocket goes through, and every status label shown. */
export async function watchStates(page) {
  await page.evaluate(() => {
    window.__states = [];
    window.__labels = [];
    window.chatWebSocketService.on('state', (s) => window.__states.push(s.kind));
    const label = document.querySelector('[data-testid=status-label]');
    new MutationObserver(() => {
      const t = label.textContent;
      if (window.__labels.at(-1) !== t) window.__labels.push(t);
    }).observe(label, { childList: true, characterData: true, subtree: true });
  });
}

export async function waitState(page, kind, timeout = 15_000) {
  await page.waitForFunction((k) => window.chatWebSocketService?.state.kind === k, kind, { timeout, polling: 50 });
}

/** The messages shown in the chat, in order. */
export async function shownMessages(page) {
  return page.$$eval('[data-testid=messages] .msg', (els) =>
    els.map((e) => ({
      role: [...e.classList].find((c) => c !== 'msg'),
      text: e.querySelector('.body').textContent,
      seq: e.dataset.seq ? Number(e.dataset.seq) : null,
      status: e.dataset.status,
    })),
  );
}

export async function sendMessage(page, text) {
  await page.fill('[data-testid=composer]', text);
  await page.press('[data-testid=composer]', 'Enter');
}

export function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}
