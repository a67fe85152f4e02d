/**
 * The connection status indicator (always visible, in plain words, with the close code and its
 * name behind Details) with Retry and Diagnose, and the
 * diagnostics dialog that fills in step by step and copies the report.
 */

import {
  type ChatSocket,
  type ConnectionState,
  formatReport,
  runWebSocketDiagnostics,
  type DiagnosticStep,
  type DiagnosticsReport,
  ClosePolicy,
  closeAdvice,
  closeHeadline,
  closeTechnical,
} from '@natter/client';
import { clear, copyToClipboard, h } from './dom';

/** What the status bar shows: `label` and `detail` in plain words, `tech` (close code, name, reason, attempt) behind Details. */
export interface StatusText {
  label: string;
  tone: 'ok' | 'busy' | 'warn' | 'bad' | 'idle';
  detail?: string;
  tech?: string;
}

const names = new ClosePolicy();

/**
 * The status line for a state. While the tab is hidden (`hidden`), a problem that is being
 * retried reads as a quiet "Reconnecting…": nobody is looking, and the tab reconnects at once
 * when it is shown again, so no error state flashes up on the way back.
 */
export function describeState(s: ConnectionState, now = Date.now(), opts: { hidden?: boolean } = {}): StatusText {
  const secs = (at: number) => Math.max(0, Math.ceil((at - now) / 1000));
  const retrying = (what: string | null, verb: string, at: number) => {
    const n = secs(at);
    const tail = n > 0 ? `${verb} in ${n} s` : `${verb}…`;
    return what ? `${what} — ${tail}` : tail.charAt(0).toUpperCase() + tail.slice(1);
  };
  switch (s.kind) {
    case 'idle':
      return { label: 'Not connected', tone: 'idle' };
    case 'checking':
      return { label: 'Connecting…', tone: 'busy', detail: 'checking the server' };
    case 'connecting':
      return { label: 'Connecting…', tone: 'busy' };
    case 'open':
      // SSE: the network would not carry a WebSocket (or the app asked for HTTP streaming).
      return s.transport === 'sse'
        ? { label: 'Connected', tone: 'ok', detail: 'using HTTP streaming' }
        : { label: 'Connected', tone: 'ok' };
    case 'reconnecting': {
      const tech = [s.lastClose ? closeTechnical(s.lastClose) : null, `attempt ${s.attempt}`].filter(Boolean).join(' · ');
      if (opts.hidden) return { label: 'Reconnecting…', tone: 'warn', tech };
      return { label: retrying(s.lastClose ? closeHeadline(s.lastClose.code) : null, 'reconnecting', s.retryAt), tone: 'warn', tech };
    }
    case 'offline':
      return {
        label: "You're offline — waiting for the network",
        tone: 'warn',
        tech: s.lastClose ? closeTechnical(s.lastClose) : undefined,
      };
    case 'backend_unavailable': {
      const tech = `${s.error} · attempt ${s.attempt}`;
      if (opts.hidden) return { label: 'Reconnecting…', tone: 'warn', tech };
      return {
        label: retrying(s.status === 0 ? "Can't reach the server" : 'The server is not ready', 'retrying', s.retryAt),
        tone: 'bad',
        tech,
      };
    }
    case 'failed':
      return {
        label: closeHeadline(s.code) ?? 'Not connected',
        tone: 'bad',
        detail: closeAdvice(s.code),
        tech: `${closeTechnical({ code: s.code, name: names.verdict(s.code).name, reason: s.reason })} — ${s.advice}`,
      };
  }
}

export function mountStatus(root: HTMLElement, socket: ChatSocket, getToken: () => string | null): void {
  const dot = h('span', { class: 'dot', 'aria-hidden': 'true' });
  const label = h('span', { class: 'status-label', 'data-testid': 'status-label' });
  const detail = h('span', { class: 'status-detail', 'data-testid': 'status-detail' });
  const tech = h('span', { id: 'status-tech', class: 'status-tech', hidden: true, 'data-testid': 'status-tech' });
  const more = h(
    'button',
    {
      type: 'button',
      class: 'link status-more',
      'aria-expanded': 'false',
      'aria-controls': 'status-tech',
      'data-testid': 'status-more',
      onclick: () => {
        tech.hidden = !tech.hidden;
        more.setAttribute('aria-expanded', String(!tech.hidden));
      },
    },
    'Details',
  );
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
  const bar = h(
    'div',
    { class: 'status', 'data-testid': 'status' },
    dot,
    h('span', { class: 'status-text' }, label, detail, ' ', more, tech),
    retry,
    diagnose,
    announce,
  );
  root.appendChild(bar);
  let lastBot: string | null = null;
  let announced = '';

  const render = () => {
    const s = socket.state;
    if (socket.getCurrentBotId()) lastBot = socket.getCurrentBotId();
    const d = describeState(s, Date.now(), { hidden: document.visibilityState === 'hidden' });
    bar.dataset.state = s.kind;
    bar.dataset.tone = d.tone;
    label.textContent = d.label;
    detail.textContent = d.detail ? ` — ${d.detail}` : '';
    // A new try keeps the last problem's details at hand until it connects or fails anew.
    const keep = s.kind === 'checking' || s.kind === 'connecting';
    const techText = d.tech ?? (keep ? tech.textContent : '') ?? '';
    tech.textContent = techText;
    more.hidden = !techText;
    if (!techText) {
      tech.hidden = true;
      more.setAttribute('aria-expanded', 'false');
    }
    retry.disabled = !socket.getCurrentBotId() || s.kind === 'open' || s.kind === 'connecting' || s.kind === 'checking';
    diagnose.disabled = !(socket.getCurrentBotId() ?? lastBot);
    bar.title = techText || d.detail || d.label;
    if (announced !== s.kind) {
      announced = s.kind;
      announce.textContent = `Connection: ${d.label.replace(/ in \d+ s/, '')}`;
    }
  };
  socket.on('state', render);
  document.addEventListener('visibilitychange', render);
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
  const summaryFix = h('p', { class: 'fix', hidden: true, 'data-testid': 'diag-summary-fix' });
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
        copied.textContent = (await copyToClipboard(text)) ? 'Copied.' : 'Copy failed: select the text below.';
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
    summaryFix,
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
        h(
          'div',
          null,
          h('strong', null, s.title),
          s.value ? h('span', { class: 'value' }, ` ${s.value}`) : null,
          h('div', { class: 'detail' }, s.detail),
          s.fix && s.status !== 'ok' && s.status !== 'skip' ? h('div', { class: 'fix' }, `Fix: ${s.fix}`) : null,
        ),
      ),
    );
  };
  clear(list);
  // The chat's own transport, and why, when it is this bot's.
  const inUse = socket.getCurrentBotId() === botId ? socket.transportInfo : undefined;
  void runWebSocketDiagnostics(botId, token, { ...socket.endpoints, onStep: addStep, inUse }).then((r) => {
    report = r;
    (window as unknown as { lastDiagnosticsReport?: DiagnosticsReport }).lastDiagnosticsReport = r;
    summary.textContent =
      r.summary.status === 'fail'
        ? `✗ ${r.summary.headline}`
        : r.summary.status === 'warn'
          ? `⚠ ${r.summary.headline}`
          : `✓ ${r.summary.headline}`;
    summary.dataset.status = r.summary.status;
    if (r.summary.fix) {
      summaryFix.textContent = `Fix: ${r.summary.fix}`;
      summaryFix.hidden = false;
    }
    dialog.dataset.done = 'true';
    copyBtn.disabled = false;
  });
}
