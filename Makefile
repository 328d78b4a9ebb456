.PHONY: demo test test-fast test-cloud lint bench clean

# Install everything and run the mixed example pipeline (FLAVOR=local by default).
demo:
	FLAVOR=$(or $(FLAVOR),local) scripts/demo.sh

# Install everything and run the whole test suite, slow end-to-end cases included.
test:
	scripts/test.sh

# The quick subset while developing: everything not marked slow.
test-fast:
	scripts/test.sh -m "not slow"

# The conformance suite against a real account of one flavor (FLAVOR=kubernetes|sagemaker|vertex|azureml|modal),
# configured by the STEPOPS_CLOUD_<FLAVOR>_* variables of docs/permissions.md; without them every test is skipped.
CLOUD_FLAVORS := kubernetes sagemaker vertex azureml modal
test-cloud:
	$(if $(and $(filter 1,$(words $(FLAVOR))),$(filter $(CLOUD_FLAVORS),$(FLAVOR))),,$(error make test-cloud needs FLAVOR=<one of: $(CLOUD_FLAVORS)>, got FLAVOR=$(or $(FLAVOR),<unset>)))
	scripts/test-cloud.sh $(FLAVOR)

lint:
	uv run --frozen ruff check airflow_stepops tests dags_examples benchmarks
	uv run --frozen mypy airflow_stepops

# Benchmarks of DESIGN section 7; prints ratios against baselines measured in the same run.
bench:
	uv run --frozen python -m benchmarks

clean:
	rm -rf .airflow .pytest_cache .mypy_cache .ruff_cache
