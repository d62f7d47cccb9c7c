"""The autoscaling rule and its options, without processes (times are given)."""

from __future__ import annotations

import pytest

import streamwise
from streamwise.autoscaling.policy import Decider, wanted
from streamwise.config import DeploymentConfig
from streamwise.exceptions import UsageError


def _decider(**options) -> Decider:
    return Decider("app", "Model", streamwise.AutoscalingConfig(**options))


def test_wanted_is_the_load_over_the_target_within_bounds():
    config = streamwise.AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=2)
    assert wanted(config, 1, 7) == 4  # ceil(7 / 2)
    assert wanted(config, 4, 0) == 1  # never below min_replicas
    assert wanted(config, 4, 100) == 10  # never above max_replicas
    to_zero = streamwise.AutoscalingConfig(min_replicas=0, max_replicas=10, target_ongoing_requests=2)
    assert wanted(to_zero, 3, 0) == 0
    assert wanted(to_zero, 0, 0.2) == 1  # any load needs a replica


def test_factors_move_part_of_the_way():
    config = streamwise.AutoscalingConfig(
        max_replicas=100, target_ongoing_requests=1, upscaling_factor=0.5, downscaling_factor=0.25
    )
    assert wanted(config, 2, 10) == 6  # 2 + 0.5 * (10 - 2)
    assert wanted(config, 10, 2) == 8  # 10 - 0.25 * (10 - 2)


def test_delays_hold_a_change_until_it_was_wanted_long_enough():
    decider = _decider(max_replicas=5, target_ongoing_requests=1, upscale_delay_s=2, downscale_delay_s=10)
    assert decider.decide(0.0, 1, 1, 4, 0) == 1
    assert decider.decide(1.9, 1, 1, 4, 0) == 1
    assert decider.decide(2.0, 1, 1, 4, 0) == 4
    assert decider.decide(3.0, 4, 4, 0, 0) == 4  # wanting fewer starts the downscale clock
    assert decider.decide(8.0, 4, 4, 4, 0) == 4  # load back: the clock resets
    assert decider.decide(9.0, 4, 4, 0, 0) == 4
    assert decider.decide(18.9, 4, 4, 0, 0) == 4
    assert decider.decide(19.0, 4, 4, 0, 0) == 1


def test_from_zero_a_waiting_call_scales_up_at_once():
    decider = _decider(min_replicas=0, max_replicas=3, upscale_delay_s=30)
    assert decider.decide(0.0, 0, 0, 0, 0) == 0
    assert decider.decide(0.1, 0, 0, 0, 5) == 3


def test_a_custom_policy_is_clamped_and_its_errors_keep_the_count():
    seen = []

    def policy(context: streamwise.AutoscalingContext) -> int:
        seen.append((context.current_replicas, context.total_requests, context.state.setdefault("n", 0)))
        context.state["n"] += 1
        if context.total_requests < 0:
            raise RuntimeError("never")
        return {1: 50, 2: "three"}.get(len(seen), 2)

    decider = _decider(max_replicas=4, policy=policy)
    assert decider.decide(0.0, 1, 1, 3, 1) == 4  # 50, kept within max_replicas
    assert decider.decide(0.1, 4, 4, 3, 1) == 4  # not an int: unchanged
    assert decider.decide(0.2, 4, 4, 3, 1) == 2
    assert seen == [(1, 4, 0), (4, 4, 1), (4, 4, 2)]  # state persists between calls


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(min_replicas=3, max_replicas=2), "min_replicas (3) must be <= max_replicas (2)"),
        (dict(max_replicas=0), "max_replicas must be >= 1"),
        (dict(max_replicas=4, initial_replicas=5), "initial_replicas must be None or an int within [min_replicas, max_replicas] = [1, 4]"),
        (dict(target_ongoing_requests=0), "target_ongoing_requests must be a number > 0"),
        (dict(upscale_delay_s=-1), "upscale_delay_s must be a number >= 0"),
        (dict(policy="mod:fn"), "policy must be None or a function"),
    ],
)
def test_bad_autoscaling_options_say_what_is_wrong(options, message):
    with pytest.raises(UsageError) as raised:
        streamwise.AutoscalingConfig(**options)
    assert message in str(raised.value)


def test_num_replicas_and_autoscaling_config_together():
    assert DeploymentConfig(name="M", num_replicas="auto").autoscaling_config.max_replicas == 100
    given = streamwise.AutoscalingConfig(min_replicas=0, max_replicas=3)
    assert DeploymentConfig(name="M", num_replicas="auto", autoscaling_config=given).autoscaling_config is given
    assert DeploymentConfig(name="M", autoscaling_config={"max_replicas": 3}).start_replicas == 1
    assert DeploymentConfig(name="M", autoscaling_config=given).start_replicas == 0
    with pytest.raises(UsageError, match="'M' sets both num_replicas=2 and autoscaling_config"):
        DeploymentConfig(name="M", num_replicas=2, autoscaling_config=given)
    with pytest.raises(UsageError, match="num_replicas of 'M' must be an int >= 1 or \"auto\""):
        DeploymentConfig(name="M", num_replicas="many")


def test_options_switch_between_fixed_and_autoscaled():
    @streamwise.deployment(autoscaling_config=streamwise.AutoscalingConfig(max_replicas=3))
    class Model:
        pass

    fixed = Model.options(num_replicas=2)
    assert "num_replicas=2" in repr(fixed)
    back = fixed.options(autoscaling_config={"max_replicas": 5})
    assert "max_replicas=5" in repr(back)
