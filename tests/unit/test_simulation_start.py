"""Ray's start-up inside ``fedsplit simulate``: a raylet that misses Ray's fixed registration
window on a busy machine is started again, not taken as the run's failure."""

import pytest
import ray

from fedsplit.federation.simulate import RAY_START_ATTEMPTS, SimulationFailed, start_ray

TIMEOUT = Exception("The current node timed out during startup. This could happen because ...")


class RayStarts:
    def __init__(self, failures: list[Exception]):
        self.failures = failures
        self.inits: list[dict] = []
        self.shutdowns = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self):
        self.shutdowns += 1


@pytest.fixture
def ray_starts(monkeypatch):
    def install(failures):
        starts = RayStarts(failures)
        monkeypatch.setattr(ray, "init", starts.init)
        monkeypatch.setattr(ray, "shutdown", starts.shutdown)
        return starts

    return install


def test_a_raylet_that_times_out_at_start_up_is_started_again_with_the_same_arguments(ray_starts):
    starts = ray_starts([TIMEOUT, TIMEOUT])
    start_ray({"num_cpus": 2, "log_to_driver": False})
    assert len(starts.inits) == 3 and starts.shutdowns == 2
    assert all(i["num_cpus"] == 2 and i["log_to_driver"] is False for i in starts.inits)
    assert all("PYTHONPATH" in i["runtime_env"]["env_vars"] for i in starts.inits)


def test_ray_that_never_starts_is_a_simulation_failure_after_the_last_attempt(ray_starts):
    starts = ray_starts([TIMEOUT] * RAY_START_ATTEMPTS)
    with pytest.raises(SimulationFailed, match="Ray did not start.*timed out during startup"):
        start_ray({"num_cpus": 1})
    assert len(starts.inits) == RAY_START_ATTEMPTS


def test_any_other_ray_error_is_not_retried(ray_starts):
    starts = ray_starts([ValueError("num_cpus must be positive")])
    with pytest.raises(SimulationFailed, match="num_cpus must be positive"):
        start_ray({"num_cpus": 1})
    assert len(starts.inits) == 1
