/**
 * The chat screen: history (older pages on scroll up), live messages, streamed replies, and
 * each own message's pending → sent → failed state. Rows are keyed by message id and by
 * client_id, so a message shown once is never shown twice, whatever mix of history, replay,
 * ack and other-tab frames delivers it.
 */

import { ChatError, type ChatSocket, uuid, type BotView, type MessagesPage, type WireMessage } from '@natter/client';
import { fmtTime, h } from './dom';
import { renderMarkdown } from './markdown';
import { ApiError, SessionExpired, type Session } from './session';
import { errorText } from './views';

type RowStatus = 'pending' | 'sent' | 'failed' | 'streaming' | 'received';

interface Row {
  el: HTMLElement;
  body: HTMLElement;
  meta: HTMLElement;
  seq: number | null;
  id: string | null;
  clientId: string | null;
  role: 'user' | 'bot' | 'system';
  content: string;
  status: RowStatus;
}

const PAGE = 50;

export function chatView(
  session: Session,
  socket: ChatSocket,
  botId: string,
  onFatal: (e: unknown) => void,
): { el: HTMLElement; dispose: () => void } {
  const title = h('h1', { class: 'chat-title', 'data-testid': 'chat-title' }, 'Chat');
  const notice = h('p', { class: 'error', role: 'alert', 'data-testid': 'chat-error' });
  const older = h(
    'button',
    { type: 'button', class: 'small secondary older', hidden: true, 'data-testid': 'load-older' },
    'Load older messages',
  );
  const list = h(
    'div',
    { class: 'messages', role: 'log', 'aria-live': 'polite', 'aria-label': 'Messages', tabindex: '0', 'data-testid': 'messages' },
    older,
  );
  const input = h('textarea', {
    rows: 1,
    placeholder: 'Write a message… (Enter to send, Shift+Enter for a new line)',
    'aria-label': 'Message',
    'data-testid': 'composer',
  });
  const sendBtn = h('button', { type: 'submit', 'data-testid': 'send' }, 'Send');
  const form = h('form', { class: 'composer' }, input, sendBtn);
  const el = h(
    'main',
    { class: 'chat' },
    h('div', { class: 'row spread' }, h('a', { href: '#/bots', class: 'back' }, '← Bots'), title),
    notice,
    list,
    form,
  );

  const byId = new Map<string, Row>();
  const byClient = new Map<string, Row>();
  let oldestSeq: number | null = null;
  let hasMore = false;
  let loadingOlder = false;
  let disposed = false;

  const nearBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  const scrollToEnd = () => {
    list.scrollTop = list.scrollHeight;
  };

  function statusText(r: Row): string {
    switch (r.status) {
      case 'pending':
        return socket.isConnected() ? 'Sending…' : 'Queued — sends when connected';
      case 'sent':
        return 'Sent';
      case 'failed':
        return 'Not sent';
      case 'streaming':
        return 'typing…';
      default:
        return '';
    }
  }

  function renderMeta(r: Row, failure?: string): void {
    r.el.dataset.status = r.status;
    r.meta.replaceChildren();
    const t = r.el.dataset.time ? fmtTime(r.el.dataset.time) : '';
    if (t) r.meta.append(t);
    const s = statusText(r);
    if (s) r.meta.append(h('span', { class: 'msg-status', 'data-testid': 'msg-status' }, `${t ? ' · ' : ''}${s}`));
    if (r.status === 'streaming' && r.id) {
      const id = r.id;
      r.meta.append(
        ' ',
        h('button', { type: 'button', class: 'link', 'data-testid': 'msg-stop', onclick: () => socket.cancel(id) }, 'Stop'),
      );
    }
    const stored = r.el.dataset.msgStatus;
    if (r.status === 'received' && stored) {
      r.meta.append(h('span', { class: 'msg-status' }, stored === 'cancelled' ? ' · stopped' : ' · incomplete'));
    }
    if (r.status === 'failed') {
      if (failure) r.meta.append(h('span', { class: 'msg-error' }, ` — ${failure}`));
      r.meta.append(
        ' ',
        h('button', { type: 'button', class: 'link', 'data-testid': 'msg-retry', onclick: () => retryRow(r) }, 'Retry'),
        ' ',
        h('button', { type: 'button', class: 'link', onclick: () => discardRow(r) }, 'Discard'),
      );
    }
  }

  function makeRow(role: Row['role'], content: string, status: RowStatus): Row {
    const body = h('div', { class: role === 'bot' ? 'body md' : 'body' });
    const meta = h('div', { class: 'meta' });
    const el = h('div', { class: `msg ${role}`, 'data-testid': 'message' }, body, meta);
    const r: Row = { el, body, meta, seq: null, id: null, clientId: null, role, content, status };
    setBody(r);
    return r;
  }

  /** Bot replies are Markdown (sanitised); what people type stays plain text. */
  function setBody(r: Row): void {
    if (r.role === 'bot') r.body.replaceChildren(renderMarkdown(r.content));
    else r.body.textContent = r.content;
  }

  // A streaming reply is re-rendered at most once a frame, and only that reply: deltas can come
  // far faster than a screen refreshes, and each render parses the whole reply so far.
  const dirty = new Set<Row>();
  let frame = 0;
  function renderSoon(r: Row): void {
    dirty.add(r);
    if (!frame) frame = requestAnimationFrame(flushRenders);
  }
  function flushRenders(): void {
    frame = 0;
    const stick = nearBottom();
    for (const r of dirty) if (r.status === 'streaming') setBody(r);
    dirty.clear();
    if (stick) scrollToEnd();
  }

  /** Puts a row where its seq says (rows without a seq stay at the end). */
  function place(r: Row): void {
    const stick = nearBottom();
    if (r.seq === null) list.appendChild(r.el);
    else {
      r.el.dataset.seq = String(r.seq);
      let before: Element | null = null;
      for (const child of list.querySelectorAll('.msg')) {
        if (child === r.el) continue;
        const s = (child as HTMLElement).dataset.seq;
        if (s === undefined || Number(s) > r.seq) {
          before = child;
          break;
        }
      }
      list.insertBefore(r.el, before);
    }
    if (stick) scrollToEnd();
  }

  function setStored(r: Row, m: WireMessage): void {
    r.id = m.id;
    r.seq = m.seq;
    r.content = m.content;
    dirty.delete(r);
    setBody(r);
    r.el.dataset.id = m.id;
    r.el.dataset.time = m.created_at;
    if (m.status !== 'complete') r.el.dataset.msgStatus = m.status;
    byId.set(m.id, r);
    place(r);
  }

  /** A stored message from any source: history, live, replay, other tab. */
  function upsert(m: WireMessage): void {
    let r = byId.get(m.id) ?? (m.client_id ? byClient.get(m.client_id) : undefined);
    if (r) {
      if (r.status === 'pending' || r.status === 'failed') r.status = 'sent';
      if (r.status === 'streaming') r.status = 'received';
      setStored(r, m);
      renderMeta(r);
      return;
    }
    r = makeRow(m.role, m.content, m.role === 'user' ? 'sent' : 'received');
    if (m.client_id) {
      r.clientId = m.client_id;
      byClient.set(m.client_id, r);
    }
    setStored(r, m);
    renderMeta(r);
  }

  function addPending(clientId: string, content: string): Row {
    const r = makeRow('user', content, 'pending');
    r.clientId = clientId;
    r.el.dataset.clientId = clientId;
    byClient.set(clientId, r);
    place(r);
    renderMeta(r);
    return r;
  }

  function sendRow(r: Row): void {
    r.status = 'pending';
    renderMeta(r);
    socket.send(r.content, { clientId: r.clientId! }).catch((e: unknown) => {
      if (disposed) return;
      if (e instanceof ChatError && e.code === 'disconnected') return;
      if (r.status !== 'pending') return;
      r.status = 'failed';
      renderMeta(r, e instanceof ChatError ? e.message : String(e));
    });
  }

  function retryRow(r: Row): void {
    if (!r.clientId) return;
    if (socket.outboxFor(botId).some((e) => e.client_id === r.clientId)) {
      // Still queued (the connection failed): reconnect now and it goes out.
      r.status = 'pending';
      renderMeta(r);
      sendRow(r);
      if (!socket.isConnected()) socket.retryNow();
      return;
    }
    // The server refused it: it was never stored, so a new id is right.
    byClient.delete(r.clientId);
    r.clientId = uuid();
    r.el.dataset.clientId = r.clientId;
    byClient.set(r.clientId, r);
    sendRow(r);
  }

  function discardRow(r: Row): void {
    if (r.clientId) {
      socket.discard(r.clientId);
      byClient.delete(r.clientId);
    }
    r.el.remove();
  }

  function systemNote(text: string): void {
    const r = makeRow('system', text, 'received');
    place(r);
  }

  async function loadOlder(): Promise<void> {
    if (loadingOlder || !hasMore || oldestSeq === null) return;
    loadingOlder = true;
    const prevHeight = list.scrollHeight;
    const prevTop = list.scrollTop;
    try {
      const page = await session.api<MessagesPage>(`/api/bots/${botId}/messages?before_seq=${oldestSeq}&limit=${PAGE}`);
      if (disposed) return;
      const anchor = list.querySelector('.msg');
      for (const m of page.messages) if (!byId.has(m.id)) upsertQuiet(m, anchor);
      if (page.messages.length) oldestSeq = page.messages[0].seq;
      hasMore = page.has_more;
      older.hidden = !hasMore;
      list.scrollTop = prevTop + (list.scrollHeight - prevHeight);
    } catch (e) {
      notice.textContent = errorText(e);
    } finally {
      loadingOlder = false;
    }
  }

  // Older rows must not scroll the view to the bottom.
  function upsertQuiet(m: WireMessage, anchor: Element | null): void {
    const r = makeRow(m.role, m.content, m.role === 'user' ? 'sent' : 'received');
    if (m.client_id) {
      r.clientId = m.client_id;
      byClient.set(m.client_id, r);
    }
    r.id = m.id;
    r.seq = m.seq;
    r.el.dataset.id = m.id;
    r.el.dataset.seq = String(m.seq);
    r.el.dataset.time = m.created_at;
    byId.set(m.id, r);
    list.insertBefore(r.el, anchor);
    renderMeta(r);
  }

  older.addEventListener('click', () => void loadOlder());
  list.addEventListener('scroll', () => {
    if (list.scrollTop < 60) void loadOlder();
  });

  const submit = () => {
    const content = input.value.trim();
    if (!content) return;
    input.value = '';
    const r = addPending(uuid(), content);
    scrollToEnd();
    sendRow(r);
  };
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    submit();
  });
  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      submit();
    }
  });

  const subs = [
    socket.on('message', (m) => upsert(m)),
    socket.on('ack', (a) => {
      const r = byClient.get(a.client_id);
      if (r) {
        r.status = 'sent';
        setStored(r, a.message);
        renderMeta(r);
      } else upsert(a.message);
    }),
    socket.on('delta', (d) => {
      let r = byId.get(d.message_id);
      if (!r) {
        r = makeRow('bot', '', 'streaming');
        r.id = d.message_id;
        r.el.dataset.id = d.message_id;
        byId.set(d.message_id, r);
        place(r);
        renderMeta(r);
      }
      if (r.status !== 'streaming') return;
      r.content += d.delta;
      renderSoon(r);
    }),
    socket.on('established', () => {
      // The connection is back: a history that could not load then loads now.
      if (!loaded) void loadLatest();
      // A reply still streaming is resent from its start in the first delta after a reconnect.
      for (const r of byId.values()) {
        if (r.status === 'streaming') {
          r.content = '';
          dirty.delete(r);
          r.body.replaceChildren();
        }
      }
    }),
    socket.on('rejected', ({ client_id, error }) => {
      const r = byClient.get(client_id);
      if (!r) return;
      r.status = 'failed';
      renderMeta(r, error.message);
    }),
    socket.on('error', (f) => {
      if (!f.client_id) systemNote(`${f.code}: ${f.message}`);
    }),
    socket.on('state', (s) => {
      for (const r of byClient.values()) if (r.status === 'pending') renderMeta(r);
      sendBtn.title = s.kind === 'open' ? '' : 'Messages typed now are queued and sent when the connection is back.';
    }),
  ];

  /**
   * Loads the bot's name and the latest page of history. A chat opened while the server is
   * down shows a notice and loads both once a connection is established: the socket resumes
   * from the server's latest seq, so nothing else would bring the history back.
   */
  let loaded = false;
  let loading = false;
  async function loadLatest(): Promise<number | undefined> {
    if (loading || loaded) return undefined;
    loading = true;
    try {
      const [bot, page] = await Promise.all([
        session.api<BotView>(`/api/bots/${botId}`),
        session.api<MessagesPage>(`/api/bots/${botId}/messages?before_seq=${Number.MAX_SAFE_INTEGER}&limit=${PAGE}`),
      ]);
      if (disposed) return undefined;
      loaded = true;
      title.textContent = bot.name;
      document.title = `${bot.name} — natter`;
      for (const m of page.messages) upsert(m);
      oldestSeq = page.messages.length ? page.messages[0].seq : null;
      hasMore = page.has_more;
      older.hidden = !hasMore;
      notice.textContent = '';
      scrollToEnd();
      return page.last_seq;
    } catch (e) {
      if (disposed) return undefined;
      if (e instanceof SessionExpired) {
        onFatal(e);
        return undefined;
      }
      notice.textContent =
        e instanceof ApiError && (e.status === 403 || e.status === 404)
          ? `${e.message}`
          : e instanceof ApiError && e.status === 0
            ? `${errorText(e)} The messages will appear when it's back.`
            : `Could not load the messages: ${errorText(e)}`;
      return undefined;
    } finally {
      loading = false;
    }
  }

  async function start(): Promise<void> {
    const afterSeq = await loadLatest();
    if (disposed) return;
    for (const e of socket.outboxFor(botId)) if (!byClient.has(e.client_id)) addPending(e.client_id, e.content);
    socket.connect(botId, afterSeq !== undefined ? { afterSeq } : {});
    input.focus();
  }
  void start();

  return {
    el,
    dispose() {
      disposed = true;
      if (frame) cancelAnimationFrame(frame);
      for (const u of subs) u();
      socket.disconnect();
    },
  };
}
