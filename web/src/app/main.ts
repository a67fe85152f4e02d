/**
 * The natter web app: hash routes (#/login, #/register, #/bots, #/bots/new,
 * #/bots/:id/edit, #/chat/:id), a header with the always-visible connection status, and the
 * views. Built on the client library in ../lib.
 */

import './style.css';
import { chatWebSocketService, installOnWindow, resolveEndpoints } from '@natter/client';
import { chatView } from './chat';
import { clear, h } from './dom';
import { Session, SessionExpired } from './session';
import { mountStatus } from './status';
import { botEditView, botsView, errorText, loginView } from './views';

const { apiUrl, wsUrl } = resolveEndpoints();
const session = new Session(apiUrl);
session.keepFresh();
const socket = chatWebSocketService;
socket.configure({ apiUrl, wsUrl, getToken: () => session.accessToken, refreshToken: () => session.refresh(session.accessToken) });
installOnWindow(socket);

const app = document.getElementById('app')!;
const userBox = h('span', { class: 'user', 'data-testid': 'user' });
const logout = h(
  'button',
  {
    type: 'button',
    class: 'small secondary',
    'data-testid': 'logout',
    onclick: async () => {
      await session.logout();
      location.hash = '#/login';
    },
  },
  'Log out',
);
const statusBox = h('div', { class: 'status-wrap' });
const header = h(
  'header',
  null,
  h('div', { class: 'top' }, h('a', { href: '#/bots', class: 'brand' }, 'natter'), h('span', { class: 'spacer' }), userBox, logout),
  statusBox,
);
const view = h('div', { id: 'view' });
app.append(header, view);
mountStatus(statusBox, socket, () => session.accessToken);

let dispose: (() => void) | null = null;
/** Whose messages the tab's outbox holds (kept across a "Session expired" re-login). */
const OUTBOX_OWNER = 'natter.outbox_owner';
if (session.user && !sessionStorage.getItem(OUTBOX_OWNER)) sessionStorage.setItem(OUTBOX_OWNER, session.user.username);
let notice: string | null = null;

session.onChange((why) => {
  // Unsent messages belong to the user who typed them: never send them as someone else.
  if (why === 'logout') socket.clearOutbox();
  if (why === 'login') {
    const user = session.user?.username ?? '';
    if (sessionStorage.getItem(OUTBOX_OWNER) !== user) socket.clearOutbox();
    sessionStorage.setItem(OUTBOX_OWNER, user);
  }
  if (why === 'expired') notice = 'Session expired, log in again';
  if (why === 'expired' || why === 'logout') {
    if (!location.hash.startsWith('#/login')) location.hash = '#/login';
    else route();
  }
});

function onError(e: unknown): void {
  if (e instanceof SessionExpired) {
    notice = 'Session expired, log in again';
    location.hash = '#/login';
    return;
  }
  const p = h('p', { class: 'error', role: 'alert' }, errorText(e));
  view.querySelector('main')?.prepend(p);
}

function route(): void {
  dispose?.();
  dispose = null;
  clear(view);
  const path = location.hash.replace(/^#/, '') || '/bots';
  const user = session.user;
  userBox.textContent = session.loggedIn && user ? user.username : '';
  logout.hidden = !session.loggedIn;

  if (path === '/login' || path === '/register' || !session.loggedIn) {
    const mode = path === '/register' ? 'register' : 'login';
    if (!session.loggedIn && path !== '/login' && path !== '/register') {
      location.hash = '#/login';
      return;
    }
    const n = notice;
    notice = null;
    view.append(
      loginView(session, mode, n, () => {
        location.hash = '#/bots';
      }),
    );
    document.title = 'natter';
    return;
  }
  const chat = path.match(/^\/chat\/([^/]+)$/);
  if (chat) {
    const c = chatView(session, socket, decodeURIComponent(chat[1]), onError);
    view.append(c.el);
    dispose = c.dispose;
    return;
  }
  document.title = 'natter';
  const edit = path.match(/^\/bots\/([^/]+)\/edit$/);
  if (path === '/bots/new') {
    view.append(
      botEditView(session, null, onError, (b) => {
        location.hash = `#/bots/${b.id}/edit`;
      }),
    );
  } else if (edit) {
    view.append(
      botEditView(session, decodeURIComponent(edit[1]), onError, () => {
        location.hash = '#/bots';
      }),
    );
  } else {
    view.append(botsView(session, onError));
  }
}

window.addEventListener('hashchange', route);
route();
