// Screenshots of the main screens into docs/screenshots/: login, bot list, chat with the
// status indicator (connected with a Markdown reply, and reconnecting with its Details open), the
// diagnostics report, and a phone-width chat.
// Needs web/dist built and target/debug/natter. Usage: node e2e/screenshots.mjs

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { api, launchBrowser, login, loginPage, REPO, sendMessage, sleep, startServer, stopAll, waitState } from './harness.mjs';

const OUT = join(REPO, 'docs', 'screenshots');
mkdirSync(OUT, { recursive: true });

async function main() {
  const srv = await startServer();
  const browser = await launchBrowser();
  try {
    const t = await login(srv.url, 'demo', 'demo-password');
    const bots = await api(srv.url, '/api/bots', { token: t.access_token });
    const echo = bots.find((b) => b.name === 'Echo');
    await api(srv.url, '/api/bots', {
      method: 'POST',
      token: t.access_token,
      body: {
        name: 'Support FAQ',
        description: 'Answers questions about plans and opening hours.',
        visibility: 'public',
        engine: { kind: 'echo' },
      },
    });

    const ctx = await browser.newContext({ viewport: { width: 1000, height: 700 }, deviceScaleFactor: 1 });
    const page = await ctx.newPage();
    await page.goto(`${srv.url}/#/login`);
    await page.waitForSelector('[data-testid=auth-submit]');
    await page.screenshot({ path: join(OUT, 'login.png') });

    await loginPage(page, srv, t, 'demo');
    await page.goto(`${srv.url}/#/bots`);
    await page.waitForSelector('[data-testid=chat-link]');
    await page.screenshot({ path: join(OUT, 'bots.png') });

    await api(srv.url, '/api/auth/register', { method: 'POST', body: { username: 'alice', password: 'alice-password' } });
    await api(srv.url, `/api/bots/${echo.id}/members`, {
      method: 'POST',
      token: t.access_token,
      body: { username: 'alice', role: 'chat' },
    });
    await page.goto(`${srv.url}/#/bots/${echo.id}/edit`);
    await page.waitForSelector('[data-testid=members] li[data-member=alice]');
    await page.screenshot({ path: join(OUT, 'bot-edit.png'), fullPage: true });

    await page.goto(`${srv.url}/#/chat/${echo.id}`);
    await waitState(page, 'open');
    for (const m of ['Hello! Are you there?', 'Tell me about reconnects.']) {
      await sendMessage(page, m);
      await page.waitForSelector(`.msg.bot .body > p:text-is("${m}")`);
    }
    // Bot replies are Markdown (the echo bot repeats it; what you type stays plain text).
    await sendMessage(
      page,
      'Reconnects in **three** steps:\n\n1. back off\n2. resume after the last `seq`\n3. resend the outbox\n\n```sh\nnatter doctor http://127.0.0.1:8000\n```',
    );
    await page.waitForSelector('.msg.bot .body ol');
    await page.screenshot({ path: join(OUT, 'chat-connected.png') });

    await srv.kill();
    await page.waitForFunction(
      () => /^Can't reach the server — retrying in/.test(document.querySelector('[data-testid=status-label]').textContent),
      null,
      { timeout: 15_000 },
    );
    await sendMessage(page, 'Typed while the server is down');
    await page.click('[data-testid=status-more]');
    await sleep(300);
    await page.screenshot({ path: join(OUT, 'chat-reconnecting.png') });
    await srv.start();
    await waitState(page, 'open', 40_000);

    await page.goto(`${srv.url}/#/chat/11111111-2222-4333-8444-555555555555`);
    await waitState(page, 'failed');
    await page.click('[data-testid=diagnose]');
    await page.waitForSelector('[data-testid=diagnose-dialog][data-done=true]', { timeout: 30_000 });
    await page.screenshot({ path: join(OUT, 'diagnose.png') });

    const phone = await browser.newContext({ viewport: { width: 375, height: 740 }, deviceScaleFactor: 1, isMobile: true, hasTouch: true });
    const p2 = await phone.newPage();
    await loginPage(p2, srv, t, 'demo');
    await p2.goto(`${srv.url}/#/chat/${echo.id}`);
    await waitState(p2, 'open');
    await p2.waitForSelector('.msg.bot');
    await p2.screenshot({ path: join(OUT, 'chat-phone.png') });
    console.log(`screenshots written to ${OUT}`);
  } finally {
    await browser.close();
    await stopAll();
  }
}

main().catch(async (e) => {
  console.error(e);
  await stopAll();
  process.exit(1);
});
