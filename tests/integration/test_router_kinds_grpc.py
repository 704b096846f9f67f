"""Every router kind over the gRPC data plane: a mixed plan (layer stages, head groups and experts
on other organisations) trains as the monolith does."""

import pytest

from fedsplit.federation.verify import verify

from ..unit.test_router_kinds import KINDS, plan_with


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_router_kind_trains_split_as_the_monolith_does_over_grpc(tmp_path, kind):
    result = verify(plan_with(tmp_path, "three-orgs", router_jitter=0.1, **KINDS[kind]), steps=10, transport="grpc")
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)
    assert result.loss_mono[0] != result.loss_mono[-1]
