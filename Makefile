.PHONY: demo test test-slow benchmark
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
test-slow:
	bash scripts/test.sh -m slow
benchmark:
	bash scripts/setup_venv.sh && .venv/bin/python -m pipelines.benchmark --quick --json runs/benchmark.json
