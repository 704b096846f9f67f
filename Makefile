# The two commands of the README. Each sets up ./.venv first (a no-op when it is up to date).
.PHONY: setup demo lint test test-unit test-fast bench bench-quick

setup:
	@bash scripts/setup.sh

# The demo federation: its partition map, a check that split training equals monolithic training,
# then four organisations training together in Flower's simulation engine (CPU, a few minutes).
demo: setup
	.venv/bin/fedsplit plan show configs/plans/demo/federation.yaml --png runs/demo-plan.png
	.venv/bin/fedsplit verify configs/plans/three-orgs/federation.yaml --steps 10
	.venv/bin/fedsplit simulate configs/plans/demo/federation.yaml --sample "ROMEO:"

# The formatter and linter (ruff, configured in pyproject.toml); `make test` runs it first.
LINTED = fedsplit tests benchmarks scripts examples

lint: setup
	.venv/bin/ruff format --check $(LINTED)
	.venv/bin/ruff check $(LINTED)

test: setup lint
	.venv/bin/python -m pytest -q

# The unit tests alone (tests/unit: in one process, a few minutes), and everything but the slow tests.
test-unit: setup
	.venv/bin/python -m pytest -q tests/unit

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

# The data-plane benchmarks of the README's performance section, one after another (about 20 min
# on 2 cores). bench-quick runs each in its quick mode (a few minutes).
BENCHES = bench_wire bench_split bench_torch_pipelining bench_compression bench_federation bench_recipe bench_lora_quality

bench: setup
	@for b in $(BENCHES); do echo "== $$b"; .venv/bin/python benchmarks/$$b.py || exit 1; done

bench-quick: setup
	@for b in $(BENCHES); do echo "== $$b"; .venv/bin/python benchmarks/$$b.py --quick || exit 1; done
