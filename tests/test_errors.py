"""Tests of agent_v2.errors: the names it exports and the tree it draws."""

from __future__ import annotations

import agent_v2.errors


def test_public_names_are_pinned() -> None:
    """The errors module exports exactly the documented exceptions."""
    assert sorted(agent_v2.errors.__all__) == [
        "AgentV2Error",
        "ClientError",
        "ConfigError",
        "ContainerNotFound",
        "DatasetError",
        "HTTPStatusError",
        "InstanceNotFound",
        "InvalidContainerId",
        "ProtocolError",
        "QueueFull",
        "RequestTimeout",
        "SandboxError",
        "StoreError",
        "StoreUnavailable",
        "TransportError",
    ]


def test_every_error_is_rooted_and_drawn_in_the_tree() -> None:
    """Each exception derives from AgentV2Error and appears in the docstring's tree."""
    tree = agent_v2.errors.__doc__ or ""
    for name in agent_v2.errors.__all__:
        error = getattr(agent_v2.errors, name)
        assert issubclass(error, agent_v2.errors.AgentV2Error), name
        assert f" {name}" in tree, name
