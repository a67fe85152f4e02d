/**
 * The login session: tokens in `localStorage` (under `access_token`, the key the seed's
 * console snippets read, and `refresh_token`), a REST wrapper that refreshes the access token
 * silently on a 401, and one refresh at a time across tabs (refresh tokens rotate: two tabs
 * refreshing with the same one would revoke the whole login). The access token is refreshed
 * shortly before it expires (`keepFresh`), so a long-open chat never meets a 401 or a 4401.
 */

import { http, type HttpResult, type TokenPair, type UserView, resolveEndpoints, decodeJwt } from '@natter/client';

const ACCESS = 'access_token';
const REFRESH = 'refresh_token';
const USER = 'natter.user';

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

export class SessionExpired extends Error {
  constructor() {
    super('Session expired, log in again');
    this.name = 'SessionExpired';
  }
}

type Listener = (reason: 'login' | 'logout' | 'expired') => void;

export class Session {
  readonly apiUrl: string;
  private listeners = new Set<Listener>();
  private inflight: Promise<string | null> | null = null;
  private freshTimer: ReturnType<typeof setTimeout> | null = null;
  /** When this tab last refreshed ahead of expiry (a clock far ahead of the server's must not make it loop). */
  private lastEarlyRefresh = 0;

  constructor(apiUrl = resolveEndpoints().apiUrl) {
    this.apiUrl = apiUrl;
    // Another tab logged out (or its refresh failed): follow it.
    window.addEventListener('storage', (e) => {
      if (e.key === ACCESS && !e.newValue && e.oldValue) this.emit('logout');
    });
  }

  onChange(fn: Listener): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
  private emit(r: 'login' | 'logout' | 'expired'): void {
    for (const l of this.listeners) l(r);
  }

  get accessToken(): string | null {
    return localStorage.getItem(ACCESS);
  }
  get user(): UserView | null {
    try {
      return JSON.parse(localStorage.getItem(USER) ?? 'null');
    } catch {
      return null;
    }
  }
  get loggedIn(): boolean {
    return !!this.accessToken && !!localStorage.getItem(REFRESH);
  }

  private store(p: TokenPair): void {
    localStorage.setItem(ACCESS, p.access_token);
    localStorage.setItem(REFRESH, p.refresh_token);
  }
  private clear(): void {
    localStorage.removeItem(ACCESS);
    localStorage.removeItem(REFRESH);
    localStorage.removeItem(USER);
  }

  async register(username: string, password: string): Promise<void> {
    const r = await http<UserView>(this.apiUrl, '/api/auth/register', { method: 'POST', body: { username, password } });
    if (!r.ok) throw new ApiError(r.status, r.code, r.message);
  }

  async login(username: string, password: string): Promise<void> {
    const r = await http<TokenPair>(this.apiUrl, '/api/auth/login', { method: 'POST', body: { username, password } });
    if (!r.ok) throw new ApiError(r.status, r.code, r.message);
    this.store(r.body);
    const me = await http<UserView>(this.apiUrl, '/api/auth/me', { token: r.body.access_token });
    if (me.ok) localStorage.setItem(USER, JSON.stringify(me.body));
    this.emit('login');
  }

  async logout(): Promise<void> {
    const rt = localStorage.getItem(REFRESH);
    this.clear();
    if (rt) await http(this.apiUrl, '/api/auth/logout', { method: 'POST', body: { refresh_token: rt } });
    this.emit('logout');
  }

  /**
   * A fresh access token, or null when the login is over (then listeners hear 'expired').
   * `stale` is the token the caller saw refused: if another tab already replaced it, that
   * one is returned without spending the refresh token.
   */
  refresh(stale: string | null = this.accessToken): Promise<string | null> {
    if (this.inflight) return this.inflight;
    const run = async (): Promise<string | null> => {
      const current = this.accessToken;
      if (current && current !== stale) return current;
      const rt = localStorage.getItem(REFRESH);
      if (!rt) return this.expire();
      const r = await http<TokenPair>(this.apiUrl, '/api/auth/refresh', { method: 'POST', body: { refresh_token: rt } });
      if (r.ok) {
        this.store(r.body);
        return r.body.access_token;
      }
      if (r.status === 401 || r.status === 400) return this.expire();
      // Server unreachable: keep the login; the caller fails this time and retries later.
      return null;
    };
    const locks = (navigator as Navigator & { locks?: LockManager }).locks;
    // The lock is held a moment after a new pair is stored: another tab's localStorage sees it
    // a few milliseconds later, and a tab that took the lock before then would spend the
    // rotated refresh token again (which revokes the login).
    const locked = async () => {
      const before = localStorage.getItem(REFRESH);
      const token = await run();
      if (localStorage.getItem(REFRESH) !== before) await new Promise((r) => setTimeout(r, 250));
      return token;
    };
    const p: Promise<string | null> = (
      locks ? (locks.request('natter-token-refresh', locked) as unknown as Promise<string | null>) : run()
    ).finally(() => {
      this.inflight = null;
    });
    this.inflight = p;
    return p;
  }

  /**
   * Refreshes the access token ahead of its expiry: a quarter of its lifetime before (at most
   * a minute). One tab does it for all: the one holding the `natter-token-keeper` lock (the
   * next in line takes over when it closes). Were every tab to plan it, their timers would
   * fire together, and a tab whose `localStorage` had not yet seen the first tab's new pair
   * would spend the rotated refresh token again, which revokes the login.
   */
  keepFresh(): void {
    const locks = (navigator as Navigator & { locks?: LockManager }).locks;
    let keeper = !locks;
    const plan = () => {
      if (!keeper) return;
      if (this.freshTimer) clearTimeout(this.freshTimer);
      this.freshTimer = null;
      const token = this.accessToken;
      const claims = token ? decodeJwt(token) : null;
      if (!token || !this.loggedIn || typeof claims?.exp !== 'number') return;
      // Already expired (a tab opened or woken after the end): the first call's 401 refreshes it.
      if (claims.exp * 1000 <= Date.now()) return;
      const lifetime = typeof claims.iat === 'number' && claims.exp > claims.iat ? claims.exp - claims.iat : 900;
      const ahead = Math.min(60, lifetime / 4);
      const due = Math.max((claims.exp - ahead) * 1000 - Date.now(), this.lastEarlyRefresh + (lifetime * 1000) / 2 - Date.now(), 0);
      this.freshTimer = setTimeout(async () => {
        this.freshTimer = null;
        if (this.accessToken !== token) return plan(); // refreshed meanwhile (after a 401)
        this.lastEarlyRefresh = Date.now();
        const fresh = await this.refresh(token);
        // Server unreachable: the login is kept; try again in a while (a 401 refreshes too).
        if (!fresh && this.loggedIn) this.freshTimer = setTimeout(plan, 15_000);
        else plan();
      }, due);
    };
    window.addEventListener('storage', (e) => {
      if (e.key === ACCESS) plan();
    });
    // Background tabs' timers are throttled: look again when the tab is shown.
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') plan();
    });
    this.onChange(plan);
    // A refresh whose answer is lost with the page would leave a spent refresh token behind.
    window.addEventListener('pagehide', () => {
      keeper = false;
      if (this.freshTimer) clearTimeout(this.freshTimer);
    });
    if (locks) {
      void locks.request('natter-token-keeper', () => {
        keeper = true;
        plan();
        return new Promise<never>(() => {}); // held for the life of the tab
      });
    } else plan();
  }

  private expire(): null {
    const had = this.loggedIn;
    this.clear();
    if (had) this.emit('expired');
    return null;
  }

  /** Calls the API with the access token, refreshing it once on a 401. */
  async api<T>(path: string, opts: { method?: string; body?: unknown } = {}): Promise<T> {
    let token = this.accessToken;
    if (!token) throw new SessionExpired();
    let r: HttpResult<T> = await http<T>(this.apiUrl, path, { ...opts, token });
    if (!r.ok && r.status === 401) {
      token = await this.refresh(token);
      if (!token) throw new SessionExpired();
      r = await http<T>(this.apiUrl, path, { ...opts, token });
      if (!r.ok && r.status === 401) {
        this.expire();
        throw new SessionExpired();
      }
    }
    if (!r.ok) throw new ApiError(r.status, r.code, r.message);
    return r.body;
  }
}
