.PHONY: demo test test-fast lint bench clean

# Install everything and run the mixed example pipeline (FLAVOR=local by default).
demo:
	FLAVOR=$(or $(FLAVOR),local) scripts/demo.sh

# Install everything and run the whole test suite, slow end-to-end cases included.
test:
	scripts/test.sh

# The quick subset while developing: everything not marked slow.
test-fast:
	scripts/test.sh -m "not slow"

lint:
	uv run --frozen ruff check airflow_stepops tests dags_examples benchmarks
	uv run --frozen mypy airflow_stepops

# Benchmarks of DESIGN section 7; prints ratios against baselines measured in the same run.
bench:
	uv run --frozen python -m benchmarks

clean:
	rm -rf .airflow .pytest_cache .mypy_cache .ruff_cache
