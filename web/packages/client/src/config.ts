/**
 * Where the API and the socket are: `VITE_API_URL` and `VITE_WS_URL` (as in the seed), else
 * the page's own origin, so an app served by `natter serve` needs no configuration.
 */

export interface Endpoints {
  /** e.g. `http://localhost:8000` (no trailing slash). */
  apiUrl: string;
  /** e.g. `ws://localhost:8000` (no trailing slash). */
  wsUrl: string;
}

function env(name: 'VITE_API_URL' | 'VITE_WS_URL'): string | undefined {
  try {
    const v = (import.meta as unknown as { env?: Record<string, string | undefined> }).env?.[name];
    return v?.trim() ? v.trim() : undefined;
  } catch {
    return undefined;
  }
}

function pageOrigin(): string | undefined {
  return typeof location !== 'undefined' && location.origin && location.origin !== 'null' ? location.origin : undefined;
}

/** The socket origin that goes with an http(s) origin. */
export function wsFromHttp(url: string): string {
  return url.replace(/^http(s?):\/\//i, (_m, s: string) => `ws${s}://`);
}

export function resolveEndpoints(over: Partial<Endpoints> = {}): Endpoints {
  const apiUrl = (over.apiUrl ?? env('VITE_API_URL') ?? pageOrigin() ?? 'http://127.0.0.1:8000').replace(/\/+$/, '');
  const wsUrl = (over.wsUrl ?? env('VITE_WS_URL') ?? wsFromHttp(apiUrl)).replace(/\/+$/, '');
  return { apiUrl, wsUrl };
}
