/**
 * The connection status indicator (always visible) with Retry and Diagnose, and the
 * diagnostics dialog that fills in step by step and copies the report.
 */

import type { ChatSocket, ConnectionState } from '../lib/chat-socket';
import { formatReport, runWebSocketDiagnostics, type DiagnosticStep, type DiagnosticsReport } from '../lib/diagnostics';
import { clear, h } from './dom';

export function describeState(s: ConnectionState, now = Date.now()): { label: string; tone: 'ok' | 'busy' | 'warn' | 'bad' | 'idle'; detail?: string } {
  const secs = (at: number) => Math.max(0, Math.ceil((at - now) / 1000));
  switch (s.kind) {
    case 'idle':
      return { label: 'Not connected', tone: 'idle' };
    case 'checking':
      return { label: 'Connecting…', tone: 'busy', detail: 'checking the server' };
    case 'connecting':
      return { label: 'Connecting…', tone: 'busy' };
    case 'open':
      return { label: 'Connected', tone: 'ok' };
    case 'reconnecting': {
      const why = s.lastClose ? `${s.lastClose.code} ${s.lastClose.name}${s.lastClose.reason ? `: ${s.lastClose.reason}` : ''}` : undefined;
      const n = secs(s.retryAt);
      return { label: n > 0 ? `Reconnecting in ${n} s (attempt ${s.attempt})` : `Reconnecting… (attempt ${s.attempt})`, tone: 'warn', detail: why };
    }
    case 'offline':
      return { label: 'Offline', tone: 'warn', detail: 'waiting for the network to come back' };
    case 'backend_unavailable': {
      const n = secs(s.retryAt);
      return { label: 'Server unavailable', tone: 'bad', detail: `${s.error}${n > 0 ? ` — retrying in ${n} s (attempt ${s.attempt})` : ''}` };
    }
    case 'failed':
      return { label: `Failed: ${s.reason}`, tone: 'bad', detail: s.advice };
  }
}

export function mountStatus(root: HTMLElement, socket: ChatSocket, getToken: () => string | null): void {
  const dot = h('span', { class: 'dot', 'aria-hidden': 'true' });
  const label = h('span', { class: 'status-label', 'data-testid': 'status-label' });
  const detail = h('span', { class: 'status-detail', 'data-testid': 'status-detail' });
  const retry = h('button', { type: 'button', class: 'small', 'data-testid': 'retry', onclick: () => socket.retryNow() }, 'Retry');
  const diagnose = h(
    'button',
    {
      type: 'button',
      class: 'small',
      'data-testid': 'diagnose',
      onclick: () => {
        const bot = socket.getCurrentBotId() ?? lastBot;
        if (bot) openDiagnostics(bot, getToken(), socket);
      },
    },
    'Diagnose',
  );
  // Screen readers hear state changes, not every tick of a countdown.
  const announce = h('span', { class: 'sr-only', role: 'status', 'aria-live': 'polite' });
  const bar = h('div', { class: 'status', 'data-testid': 'status' }, dot, h('span', { class: 'status-text' }, label, detail), retry, diagnose, announce);
  root.appendChild(bar);
  let lastBot: string | null = null;
  let announced = '';

  const render = () => {
    const s = socket.state;
    if (socket.getCurrentBotId()) lastBot = socket.getCurrentBotId();
    const d = describeState(s);
    bar.dataset.state = s.kind;
    bar.dataset.tone = d.tone;
    label.textContent = d.label;
    detail.textContent = d.detail ? ` — ${d.detail}` : '';
    retry.disabled = !socket.getCurrentBotId() || s.kind === 'open' || s.kind === 'connecting' || s.kind === 'checking';
    diagnose.disabled = !(socket.getCurrentBotId() ?? lastBot);
    bar.title = d.detail ?? d.label;
    if (announced !== s.kind) {
      announced = s.kind;
      announce.textContent = `Connection: ${d.label.replace(/ in \d+ s/, '')}`;
    }
  };
  socket.on('state', render);
  // Countdowns tick.
  setInterval(() => {
    if (socket.state.kind === 'reconnecting' || socket.state.kind === 'backend_unavailable') render();
  }, 500);
  render();
}

const MARK: Record<DiagnosticStep['status'], string> = { ok: '✓', warn: '⚠', fail: '✗', skip: '–' };

export function openDiagnostics(botId: string, token: string | null, socket: ChatSocket): void {
  document.querySelector('dialog.diagnose')?.remove();
  const list = h('ol', { class: 'steps', 'data-testid': 'diag-steps' });
  const summary = h('p', { class: 'diag-summary', 'data-testid': 'diag-summary' }, 'Running…');
  const copied = h('span', { class: 'copied', role: 'status' });
  let report: DiagnosticsReport | null = null;
  const copyBtn = h(
    'button',
    {
      type: 'button',
      disabled: true,
      'data-testid': 'copy-report',
      onclick: async () => {
        if (!report) return;
        const text = `${formatReport(report)}\n\n--- report (JSON) ---\n${JSON.stringify(report, null, 2)}\n\n--- flight recorder ---\n${socket.exportFlightRecorder()}`;
        copied.textContent = (await copyText(text)) ? 'Copied.' : 'Copy failed: select the text below.';
        if (!copied.textContent.startsWith('Copied')) {
          const ta = h('textarea', { class: 'report-text', readonly: true, rows: 8 }, text);
          dialog.appendChild(ta);
          ta.select();
        }
      },
    },
    'Copy report',
  );
  const close = h('button', { type: 'button', class: 'secondary', onclick: () => dialog.close() }, 'Close');
  const dialog = h(
    'dialog',
    { class: 'diagnose', 'aria-labelledby': 'diag-title', 'data-testid': 'diagnose-dialog' },
    h('h2', { id: 'diag-title' }, 'Connection diagnostics'),
    h('p', { class: 'muted' }, `Bot ${botId}`),
    summary,
    h('div', { class: 'row' }, copyBtn, close, copied),
    list,
  );
  dialog.addEventListener('close', () => dialog.remove());
  document.body.appendChild(dialog);
  dialog.showModal();
  const addStep = (s: DiagnosticStep) => {
    list.appendChild(
      h(
        'li',
        { class: `step ${s.status}`, 'data-step': s.id, 'data-status': s.status },
        h('span', { class: 'mark', 'aria-label': s.status }, MARK[s.status]),
        h('div', null, h('strong', null, s.title), s.value ? h('span', { class: 'value' }, ` ${s.value}`) : null, h('div', { class: 'detail' }, s.detail), s.fix && s.status !== 'ok' && s.status !== 'skip' ? h('div', { class: 'fix' }, `Fix: ${s.fix}`) : null),
      ),
    );
  };
  clear(list);
  void runWebSocketDiagnostics(botId, token, { ...socket.endpoints, onStep: addStep }).then((r) => {
    report = r;
    (window as unknown as { lastDiagnosticsReport?: DiagnosticsReport }).lastDiagnosticsReport = r;
    summary.textContent = r.summary.status === 'fail' ? `✗ ${r.summary.headline}` : r.summary.status === 'warn' ? `⚠ ${r.summary.headline}` : `✓ ${r.summary.headline}`;
    summary.dataset.status = r.summary.status;
    dialog.dataset.done = 'true';
    copyBtn.disabled = false;
  });
}

async function copyText(text: string): Promise<boolean> {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const ta = h('textarea', { style: 'position:fixed;opacity:0' }, text);
    document.body.appendChild(ta);
    ta.select();
    let ok = false;
    try {
      ok = document.execCommand('copy');
    } catch {
      ok = false;
    }
    ta.remove();
    return ok;
  }
}
