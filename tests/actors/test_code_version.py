"""The code version that decides whether a dead driver's replica is taken back.

The same app in two driver processes is covered on a Ray cluster
(``tests/cluster``: same code taken back, other code replaced); here, what the
version covers within one process.
"""

from __future__ import annotations

import numpy as np

import streamwise
from streamwise.actors._code_version import code_version
from streamwise.actors.spec import plan_app


@streamwise.deployment(num_replicas=2, user_config={"threshold": 1})
class Leaf:
    def __init__(self, weights, options):
        self.weights = weights

    async def __call__(self):
        return 1


@streamwise.deployment
class Root:
    def __init__(self, leaf, transform):
        self.leaf = leaf

    async def __call__(self):
        return 1


def _transform(x):
    return x


def _versions(root) -> dict[str, str]:
    return {spec.config.name: code_version(spec) for spec in plan_app(root, "app").specs}


def test_equal_specs_share_a_version_and_what_needs_a_restart_changes_it():
    """Rebuilt from the same code and arguments, the version is the same; what a
    running replica takes as it is (replica count, autoscaling, user_config) leaves
    it; arguments and config a replica is built with change it."""
    base = _versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "fast"}), _transform))
    assert all(base.values()) and base["Leaf"] != base["Root"]
    assert _versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "fast"}), _transform)) == base
    live = Leaf.options(
        num_replicas=None, user_config={"threshold": 2},
        autoscaling_config={"min_replicas": 1, "max_replicas": 4},
    )
    assert _versions(Root.bind(live.bind(np.arange(8), {"mode": "fast"}), _transform))["Leaf"] == base["Leaf"]
    other_weights = _versions(Root.bind(Leaf.bind(np.arange(9), {"mode": "fast"}), _transform))
    assert other_weights["Leaf"] != base["Leaf"] and other_weights["Root"] == base["Root"]
    other_option = _versions(Root.bind(Leaf.bind(np.arange(8), {"mode": "slow"}), _transform))
    assert other_option["Leaf"] != base["Leaf"]
    rebuilt = Leaf.options(max_ongoing_requests=7)
    assert _versions(Root.bind(rebuilt.bind(np.arange(8), {"mode": "fast"}), _transform))["Leaf"] != base["Leaf"]


def test_a_spec_that_cannot_be_written_down_alike_has_no_version():
    """A lambda among the arguments cannot be told equal in another process: no
    version, so such a replica is always replaced, never taken back."""
    versions = _versions(Root.bind(Leaf.bind(np.arange(8), {}), lambda x: x))
    assert versions["Root"] == "" and versions["Leaf"] != ""
