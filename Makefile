# The two commands of the README. Each sets up ./.venv first (a no-op when it is up to date).
.PHONY: setup demo test test-fast

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/fedsplit plan check configs/plans/three-orgs/federation.yaml
	.venv/bin/fedsplit verify configs/plans/three-orgs/federation.yaml --steps 10

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
