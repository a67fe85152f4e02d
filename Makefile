.PHONY: test
test:
	cargo nextest run --workspace
