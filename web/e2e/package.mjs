// The package test (issue 20): what a user installs is what is tested. `npm pack` @natter/client,
// install the tarball into a scratch Vite app outside the workspace, type-check the app against
// the shipped .d.ts, build it, serve it from a real `natter serve --web-dir`, and chat in
// Chromium. Needs target/debug/natter and /usr/bin/chromium; exits 1 on failure.

import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { assert, checkPrerequisites, launchBrowser, startServer, stopAll, WEB_DIR } from './harness.mjs';

const PKG_DIR = join(WEB_DIR, 'packages', 'client');
function run(cmd, args, cwd) {
  try {
    return execFileSync(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'inherit'] }).toString();
  } catch (e) {
    throw new Error(`${cmd} ${args.join(' ')} failed:\n${e.stdout ?? ''}`);
  }
}

async function main() {
  const missing = checkPrerequisites();
  if (missing.length) throw new Error(`missing: ${missing.join(', ')}`);
  const scratch = mkdtempSync(join(tmpdir(), 'natter-package-'));
  try {
    // 1. The tarball: built by `prepack`, holding only what a user needs.
    const [packed] = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', scratch], PKG_DIR));
    const files = packed.files.map((f) => f.path).sort();
    console.log(`packed ${packed.filename}: ${files.length} files, ${packed.size} bytes`);
    for (const want of ['package.json', 'README.md', 'dist/index.js', 'dist/index.d.ts', 'dist/chat-socket.js', 'dist/words.d.ts']) {
      assert(files.includes(want), `the tarball lacks ${want}: ${files.join(', ')}`);
    }
    const stray = files.filter((f) => !['package.json', 'README.md'].includes(f) && !f.startsWith('dist/'));
    assert(stray.length === 0, `the tarball carries more than dist/: ${stray.join(', ')}`);
    const manifest = JSON.parse(readFileSync(join(PKG_DIR, 'package.json'), 'utf8'));
    assert(Object.keys(manifest.dependencies).join() === 'debug', `only debug as a dependency: ${JSON.stringify(manifest.dependencies)}`);

    // 2. A scratch app that knows nothing of this repository.
    const vite = JSON.parse(readFileSync(join(WEB_DIR, 'node_modules', 'vite', 'package.json'), 'utf8')).version;
    writeFileSync(join(scratch, 'package.json'), JSON.stringify({ name: 'scratch-app', private: true, type: 'module' }, null, 2));
    writeFileSync(
      join(scratch, 'index.html'),
      '<!doctype html><html><body><ul id="log"></ul><script type="module" src="/main.ts"></script></body></html>\n',
    );
    writeFileSync(
      join(scratch, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          target: 'ES2022',
          module: 'ESNext',
          moduleResolution: 'Bundler',
          lib: ['ES2022', 'DOM'],
          strict: true,
          noEmit: true,
          skipLibCheck: false,
        },
        include: ['main.ts'],
      }),
    );
    writeFileSync(
      join(scratch, 'main.ts'),
      `import { ChatSocket, closeHeadline, type ConnectionState, type WireMessage } from '@natter/client';

const log = (line: string) => {
  const li = document.createElement('li');
  li.textContent = line;
  document.getElementById('log')!.append(li);
};
async function post<T>(path: string, body: unknown, token?: string): Promise<T> {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (token) headers.authorization = 'Bearer ' + token;
  const res = await fetch(path, { method: 'POST', headers, body: JSON.stringify(body) });
  if (!res.ok) throw new Error(path + ': ' + res.status);
  return (await res.json()) as T;
}

const creds = { username: 'pkg' + Math.floor(Math.random() * 1e9), password: 'correct-horse-battery' };
await post('/api/auth/register', creds);
const { access_token } = await post<{ access_token: string }>('/api/auth/login', creds);
const bot = await post<{ id: string }>('/api/bots', { name: 'Echo', engine: { kind: 'echo' } }, access_token);
const chat = new ChatSocket({ getToken: () => access_token });
chat.on('state', (s: ConnectionState) => (document.body.dataset.state = s.kind));
chat.on('message', (m: WireMessage) => log(m.role + ': ' + m.content));
chat.connect(bot.id);
const ack = await chat.send('hello from the package');
log('acked seq ' + ack.message.seq);
log('1012 means: ' + closeHeadline(1012));
`,
    );
    run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', join(scratch, packed.filename), `vite@${vite}`], scratch);
    // The types a user gets are enough for a strict TypeScript app.
    run(process.execPath, [join(WEB_DIR, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', scratch], scratch);
    run(process.execPath, [join(scratch, 'node_modules', 'vite', 'bin', 'vite.js'), 'build', '--logLevel', 'warn'], scratch);
    const installed = JSON.parse(readFileSync(join(scratch, 'node_modules', '@natter', 'client', 'package.json'), 'utf8'));
    assert(installed.version === manifest.version, 'the scratch app installed the tarball');

    // 3. Served by a real natter, chatted with in Chromium.
    const srv = await startServer({ demo: false, webDir: join(scratch, 'dist') });
    const browser = await launchBrowser();
    try {
      const page = await browser.newPage();
      const errors = [];
      page.on('pageerror', (e) => errors.push(e.message));
      await page.goto(srv.url);
      await page.waitForFunction(() => document.body.dataset.state === 'open', null, { timeout: 15_000 });
      await page.locator('li', { hasText: 'bot: ' }).first().waitFor({ timeout: 15_000 });
      const lines = await page.locator('#log li').allTextContents();
      console.log(`  the scratch app shows: ${JSON.stringify(lines)}`);
      assert(
        lines.some((l) => l.startsWith('bot: ') && l.includes('hello from the package')),
        'the echo bot answered',
      );
      assert(lines.includes('acked seq 1'), 'the send was acked with seq 1');
      assert(lines.includes('1012 means: The server is restarting'), 'plain words come with the package');
      assert(errors.length === 0, `page errors: ${errors.join('; ')}`);
    } finally {
      await browser.close();
    }
    console.log('package test passed');
  } finally {
    await stopAll();
    rmSync(scratch, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`package test FAILED: ${e.stack ?? e}`);
  process.exit(1);
});
