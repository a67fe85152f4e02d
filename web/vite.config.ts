import { defineConfig } from 'vitest/config';

export default defineConfig({
  build: { outDir: 'dist', emptyOutDir: true, sourcemap: true },
  server: { port: 5173, strictPort: true },
  test: {
    include: ['test/**/*.test.ts'],
    environment: 'node',
  },
});
