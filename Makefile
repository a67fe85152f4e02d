# natter: `make run` builds everything and serves http://127.0.0.1:8000 with demo data;
# `make test` installs what the tests need and runs every test.

CARGO ?= cargo
WEB_DEPS := web/node_modules/.package-lock.json

.PHONY: run test deps lint rust-test web web-test browser-test package-test clean-data fuzz-rest

# The release binary carries web/dist inside it, so `web` comes first.
run: web
	$(CARGO) run --release -p natter -- serve --demo --bot-egress-allow 127.0.0.1/32,::1,localhost

$(WEB_DEPS): web/package.json web/package-lock.json web/packages/client/package.json
	cd web && npm ci --no-audit --no-fund

web: $(WEB_DEPS)
	cd web && npm run build

test: deps lint rust-test web-test browser-test package-test fuzz-rest

deps:
	@command -v cargo-nextest >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked
	@command -v node >/dev/null 2>&1 || { echo "make test needs Node.js 20 and npm"; exit 1; }
	@test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }
	@test -x /usr/sbin/nginx || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx; }

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The Rust tests check that the built web app is served from the binary.
# The PostgreSQL, NATS and multi-node tests use the services named by NATTER_TEST_DATABASE_URL
# and NATTER_TEST_NATS_URL. Unset, they are set to the local services when those answer;
# otherwise those tests print SKIPPED (CI sets them, so there they must answer).
rust-test: web
	@if [ -z "$$NATTER_TEST_DATABASE_URL" ]; then \
	  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then export NATTER_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test; \
	  else echo "*** SKIPPED: PostgreSQL does not answer on 127.0.0.1:5432: the PostgreSQL and multi-node tests will not run ***"; fi; fi; \
	if [ -z "$$NATTER_TEST_NATS_URL" ]; then \
	  if timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/4222' 2>/dev/null; then export NATTER_TEST_NATS_URL=nats://127.0.0.1:4222; \
	  else echo "*** SKIPPED: NATS does not answer on 127.0.0.1:4222: the NATS and multi-node tests will not run ***"; fi; fi; \
	$(CARGO) nextest run --workspace --no-fail-fast

# Biome: the formatter (140 columns, biome.json) and the linter, then the unit tests.
web-test: web
	cd web && npm run lint && npm test

browser-test: web
	$(CARGO) build -p natter
	cd web && npm run test:browser

# @natter/client as a user gets it: npm pack, installed into a scratch Vite app, type-checked,
# built, served by natter and chatted with in Chromium (~30 s).
package-test: web
	$(CARGO) build -p natter
	cd web && npm run test:package

# REST fuzz of /api/openapi.json with schemathesis (pinned; pip-installed when missing) against
# a real `natter serve`: fails on any 5xx. ~2.5 min. NATTER_FUZZ_DATABASE_URL=postgres://... for PostgreSQL.
fuzz-rest:
	scripts/fuzz-rest.sh

clean-data:
	rm -rf natter-data
