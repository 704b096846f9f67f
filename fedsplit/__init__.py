"""fedsplit: federated split training of partitioned Mixture-of-Experts language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedsplit")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0"
