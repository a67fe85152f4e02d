/** Login/register, the bot list, and the bot editor with sharing. */

import type { BotView, MemberView, Visibility } from '@natter/client';
import { h } from './dom';
import { ApiError, SessionExpired, type Session } from './session';

/** Engine kinds (docs/bots.md), with an example of each one's settings. */
const ENGINES: Record<string, { label: string; example?: Record<string, unknown> }> = {
  echo: { label: 'replies with your text' },
  rules: {
    label: 'FAQ answers from keyword/regex rules',
    example: { rules: [{ keywords: ['price', 'cost'], reply: 'Plans start at 10 EUR a month.' }], fallback: "I don't know that one yet." },
  },
  openai: {
    label: 'any OpenAI-compatible model (Ollama, OpenAI, vLLM)',
    example: { base_url: 'http://localhost:11434/v1', model: 'llama3.2' },
  },
  webhook: {
    label: 'your own HTTP endpoint answers',
    example: { url: 'https://example.com/natter-hook', secret: 'at-least-16-characters' },
  },
};

export function errorText(e: unknown): string {
  // status 0: the request never got an answer; the browser's own words ("Failed to fetch") mean nothing to a person.
  if (e instanceof ApiError && e.status === 0)
    return e.code === 'timeout' ? 'The server took too long to answer.' : "Can't reach the server.";
  if (e instanceof ApiError) return e.message;
  if (e instanceof SessionExpired) return e.message;
  return e instanceof Error ? e.message : String(e);
}

export function loginView(session: Session, mode: 'login' | 'register', notice: string | null, done: () => void): HTMLElement {
  const err = h('p', { class: 'error', role: 'alert', 'data-testid': 'auth-error' });
  const username = h('input', {
    id: 'username',
    name: 'username',
    autocomplete: 'username',
    required: true,
    autofocus: true,
    'data-testid': 'username',
  });
  const password = h('input', {
    id: 'password',
    name: 'password',
    type: 'password',
    autocomplete: mode === 'login' ? 'current-password' : 'new-password',
    required: true,
    'data-testid': 'password',
  });
  const submit = h('button', { type: 'submit', 'data-testid': 'auth-submit' }, mode === 'login' ? 'Log in' : 'Create account');
  const form = h(
    'form',
    {
      class: 'card auth',
      onsubmit: async (ev: Event) => {
        ev.preventDefault();
        err.textContent = '';
        submit.disabled = true;
        try {
          if (mode === 'register') await session.register(username.value.trim(), password.value);
          await session.login(username.value.trim(), password.value);
          done();
        } catch (e) {
          err.textContent = errorText(e);
        } finally {
          submit.disabled = false;
        }
      },
    },
    h('h1', null, mode === 'login' ? 'Log in to natter' : 'Create an account'),
    notice ? h('p', { class: 'notice', role: 'alert', 'data-testid': 'auth-notice' }, notice) : null,
    h('label', { for: 'username' }, 'Username'),
    username,
    h('label', { for: 'password' }, 'Password'),
    password,
    mode === 'register' ? h('p', { class: 'muted small' }, '3–32 characters of a–z, 0–9, _ . -; password at least 8 characters.') : null,
    err,
    submit,
    h(
      'p',
      { class: 'muted' },
      mode === 'login'
        ? ['No account? ', h('a', { href: '#/register', 'data-testid': 'to-register' }, 'Register')]
        : ['Have an account? ', h('a', { href: '#/login' }, 'Log in')],
    ),
  );
  return h('main', { class: 'center' }, form);
}

export function botsView(session: Session, onError: (e: unknown) => void): HTMLElement {
  const list = h('ul', { class: 'bots', 'data-testid': 'bot-list', 'aria-busy': 'true' });
  const main = h(
    'main',
    null,
    h(
      'div',
      { class: 'row spread' },
      h('h1', null, 'Your bots'),
      h('a', { class: 'button', href: '#/bots/new', 'data-testid': 'new-bot' }, 'New bot'),
    ),
    list,
  );
  session
    .api<BotView[]>('/api/bots')
    .then((bots) => {
      list.removeAttribute('aria-busy');
      if (bots.length === 0) list.appendChild(h('li', { class: 'muted' }, 'No bots yet. Create one to start chatting.'));
      for (const b of bots) {
        const canEdit = b.my_role === 'owner' || b.my_role === 'admin';
        list.appendChild(
          h(
            'li',
            { class: 'card bot', 'data-bot-id': b.id },
            h(
              'div',
              { class: 'bot-main' },
              h('a', { href: `#/chat/${b.id}`, class: 'bot-name', 'data-testid': 'chat-link' }, b.name),
              h('span', { class: `badge ${b.visibility}` }, b.visibility),
              h(
                'span',
                { class: 'badge' },
                b.my_role === 'owner'
                  ? 'yours'
                  : b.my_role === 'public'
                    ? `public, by ${b.owner.username}`
                    : `shared by ${b.owner.username}`,
              ),
              b.description ? h('p', { class: 'muted' }, b.description) : null,
            ),
            h(
              'div',
              { class: 'row' },
              h('a', { class: 'button', href: `#/chat/${b.id}` }, 'Chat'),
              canEdit
                ? h('a', { class: 'button secondary', href: `#/bots/${b.id}/edit`, 'data-testid': 'edit-link' }, 'Edit / share')
                : null,
            ),
          ),
        );
      }
    })
    .catch(onError);
  return main;
}

export function botEditView(
  session: Session,
  botId: string | null,
  onError: (e: unknown) => void,
  saved: (bot: BotView) => void,
): HTMLElement {
  const err = h('p', { class: 'error', role: 'alert', 'data-testid': 'bot-error' });
  const name = h('input', { id: 'bot-name', required: true, maxlength: 100, 'data-testid': 'bot-name' });
  const description = h('textarea', { id: 'bot-desc', rows: 2, 'data-testid': 'bot-description' });
  const visibility = h(
    'select',
    { id: 'bot-vis', 'data-testid': 'bot-visibility' },
    h('option', { value: 'private' }, 'Private (only people you share it with)'),
    h('option', { value: 'public' }, 'Public (every user)'),
  );
  const kind = h(
    'select',
    { id: 'bot-kind', 'data-testid': 'bot-engine-kind' },
    ...Object.entries(ENGINES).map(([k, e]) => h('option', { value: k }, `${k} — ${e.label}`)),
  );
  const secretsNote = h('p', { class: 'muted small', 'data-testid': 'secrets-note' });
  const settings = h('textarea', { id: 'bot-settings', rows: 3, class: 'mono', 'data-testid': 'bot-engine-settings', placeholder: '{}' });
  const submit = h('button', { type: 'submit', 'data-testid': 'bot-save' }, botId ? 'Save' : 'Create bot');
  const form = h(
    'form',
    {
      class: 'card',
      onsubmit: async (ev: Event) => {
        ev.preventDefault();
        err.textContent = '';
        let extra: Record<string, unknown> = {};
        const raw = settings.value.trim();
        if (raw) {
          try {
            extra = JSON.parse(raw);
            if (typeof extra !== 'object' || extra === null || Array.isArray(extra)) throw new Error('settings must be a JSON object');
          } catch (e) {
            err.textContent = `Engine settings: ${(e as Error).message}`;
            return;
          }
        }
        const body = {
          name: name.value.trim(),
          description: description.value,
          visibility: visibility.value as Visibility,
          engine: { ...extra, kind: kind.value },
        };
        submit.disabled = true;
        try {
          const bot = await session.api<BotView>(botId ? `/api/bots/${botId}` : '/api/bots', { method: botId ? 'PATCH' : 'POST', body });
          saved(bot);
        } catch (e) {
          if (e instanceof SessionExpired) onError(e);
          else err.textContent = errorText(e);
        } finally {
          submit.disabled = false;
        }
      },
    },
    h('h1', null, botId ? 'Edit bot' : 'New bot'),
    h('label', { for: 'bot-name' }, 'Name'),
    name,
    h('label', { for: 'bot-desc' }, 'Description'),
    description,
    h('label', { for: 'bot-vis' }, 'Visibility'),
    visibility,
    h('label', { for: 'bot-kind' }, 'Engine'),
    kind,
    h('label', { for: 'bot-settings' }, 'Engine settings (JSON, without "kind")'),
    settings,
    secretsNote,
    err,
    h('div', { class: 'row' }, submit, h('a', { class: 'button secondary', href: '#/bots' }, 'Cancel')),
  );
  // A new bot gets an example of the chosen engine's settings.
  kind.addEventListener('change', () => {
    const example = ENGINES[kind.value]?.example;
    if (!settings.value.trim() || Object.values(ENGINES).some((e) => e.example && settings.value === JSON.stringify(e.example, null, 2))) {
      settings.value = example ? JSON.stringify(example, null, 2) : '';
    }
  });
  const main = h('main', null, form);
  if (botId) {
    session
      .api<BotView>(`/api/bots/${botId}`)
      .then((b) => {
        name.value = b.name;
        description.value = b.description;
        visibility.value = b.visibility;
        const { kind: k, ...rest } = b.engine as { kind?: string } & Record<string, unknown>;
        if (k && ![...kind.options].some((o) => o.value === k)) kind.appendChild(h('option', { value: k }, k));
        kind.value = k ?? 'echo';
        // Secrets are write-only: the server shows `api_key_set: true` and keeps the secret when
        // an update leaves it out.
        const set = Object.keys(rest).filter((x) => x.endsWith('_set') && rest[x] === true);
        for (const x of set) delete rest[x];
        secretsNote.textContent = set.length
          ? `${set.map((x) => x.replace(/_set$/, '')).join(', ')} is set and kept unless you enter a new one.`
          : '';
        settings.value = Object.keys(rest).length ? JSON.stringify(rest, null, 2) : '';
        main.appendChild(shareView(session, b, onError));
      })
      .catch(onError);
  }
  return main;
}

function shareView(session: Session, bot: BotView, onError: (e: unknown) => void): HTMLElement {
  const list = h('ul', { class: 'members', 'data-testid': 'members' });
  const err = h('p', { class: 'error', role: 'alert', 'data-testid': 'share-error' });
  const username = h('input', {
    id: 'share-user',
    required: true,
    autocomplete: 'off',
    placeholder: 'username',
    'data-testid': 'share-username',
  });
  const role = h(
    'select',
    { id: 'share-role', 'data-testid': 'share-role' },
    h('option', { value: 'chat' }, 'may chat'),
    h('option', { value: 'admin' }, 'may chat and edit'),
  );
  const load = async () => {
    try {
      const members = await session.api<MemberView[]>(`/api/bots/${bot.id}/members`);
      list.replaceChildren(
        ...(members.length
          ? members.map((m) =>
              h(
                'li',
                { 'data-member': m.user.username },
                h('span', null, `${m.user.username} — ${m.role === 'admin' ? 'may chat and edit' : 'may chat'}`),
                h(
                  'button',
                  {
                    type: 'button',
                    class: 'small secondary',
                    'data-testid': 'remove-member',
                    'aria-label': `Remove ${m.user.username}`,
                    onclick: async () => {
                      try {
                        await session.api(`/api/bots/${bot.id}/members/${encodeURIComponent(m.user.username)}`, { method: 'DELETE' });
                        await load();
                      } catch (e) {
                        err.textContent = errorText(e);
                      }
                    },
                  },
                  'Remove',
                ),
              ),
            )
          : [h('li', { class: 'muted' }, 'Not shared with anyone.')]),
      );
    } catch (e) {
      onError(e);
    }
  };
  void load();
  return h(
    'section',
    { class: 'card' },
    h('h2', null, 'Share'),
    list,
    h(
      'form',
      {
        class: 'row wrap',
        onsubmit: async (ev: Event) => {
          ev.preventDefault();
          err.textContent = '';
          try {
            await session.api(`/api/bots/${bot.id}/members`, {
              method: 'POST',
              body: { username: username.value.trim(), role: role.value },
            });
            username.value = '';
            await load();
          } catch (e) {
            err.textContent = errorText(e);
          }
        },
      },
      h('label', { for: 'share-user', class: 'sr-only' }, 'Username to share with'),
      username,
      h('label', { for: 'share-role', class: 'sr-only' }, 'Role'),
      role,
      h('button', { type: 'submit', 'data-testid': 'share-submit' }, 'Share'),
    ),
    err,
  );
}
