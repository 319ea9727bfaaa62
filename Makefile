# The project's commands; README.md names `make run` and `make test`.
.PHONY: run test stack-up stack-down stack-status lint bench

run:          ## bring up the stack, migrate, run the four services
	scripts/run

test:         ## bring up the stack and run every test
	scripts/test

stack-up:
	scripts/stack up

stack-down:
	scripts/stack down

stack-status:
	scripts/stack status

bench:        ## benchmarks, as ratios to limits measured in the same run
	scripts/bench

lint:         ## formatting and clippy, as CI checks them
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
