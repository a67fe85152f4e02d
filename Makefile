# natter: `make run` builds everything and serves http://127.0.0.1:8000 with demo data;
# `make test` installs what the tests need and runs every test.

CARGO ?= cargo
WEB_DEPS := web/node_modules/.package-lock.json

.PHONY: run test deps lint rust-test web web-test browser-test clean-data

# The release binary carries web/dist inside it, so `web` comes first.
run: web
	$(CARGO) run --release -p natter -- serve --demo

$(WEB_DEPS): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund

web: $(WEB_DEPS)
	cd web && npm run build

test: deps lint rust-test web-test browser-test

deps:
	@command -v cargo-nextest >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked
	@command -v node >/dev/null 2>&1 || { echo "make test needs Node.js 20 and npm"; exit 1; }
	@test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The Rust tests check that the built web app is served from the binary.
rust-test: web
	$(CARGO) nextest run --workspace --no-fail-fast

web-test: web
	cd web && npm test

browser-test: web
	$(CARGO) build -p natter
	cd web && npm run test:browser

clean-data:
	rm -rf natter-data
