# The two commands of the README.  Both bootstrap themselves (system packages when root,
# .venv, the package); see tools/bootstrap.sh.
.PHONY: demo test bootstrap clean

PYTEST_ARGS ?=

bootstrap:
	@bash tools/bootstrap.sh

demo: bootstrap
	.venv/bin/booster-demo

test: bootstrap
	.venv/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf .venv .pytest_cache .hypothesis build *.egg-info
