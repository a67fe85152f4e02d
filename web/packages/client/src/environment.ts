/** Where `ChatSocket` hears of online/offline and of the tab being shown again. */

/** Where online/offline and visibility come from; a test passes its own. */
export interface Environment {
  isOnline(): boolean;
  isVisible(): boolean;
  /** Subscribes to `online`, `offline` and `visibilitychange`; returns the unsubscribe. */
  listen(on: { online(): void; offline(): void; visible(): void }): () => void;
}

export function browserEnvironment(): Environment {
  return {
    isOnline: () => (typeof navigator === 'undefined' ? true : navigator.onLine !== false),
    isVisible: () => (typeof document === 'undefined' ? true : document.visibilityState !== 'hidden'),
    listen(on) {
      if (typeof window === 'undefined') return () => {};
      const vis = () => {
        if (document.visibilityState === 'visible') on.visible();
      };
      window.addEventListener('online', on.online);
      window.addEventListener('offline', on.offline);
      document.addEventListener('visibilitychange', vis);
      return () => {
        window.removeEventListener('online', on.online);
        window.removeEventListener('offline', on.offline);
        document.removeEventListener('visibilitychange', vis);
      };
    },
  };
}
