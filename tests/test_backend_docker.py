"""The Docker backend's pure parts: docker inspect -> InstanceInfo (with the address rule),
raw event -> BackendEvent. No engine needed; the engine paths are in the *_docker tests."""

from __future__ import annotations

from typing import Any

from hestia.backends.docker import event_from_raw, info_from_inspect, resolve_address


def _inspect(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Id": "a" * 64,
        "Name": "/proj-web-1",
        "Created": "2026-11-27T10:20:30.123456789Z",
        "State": {"Running": True, "Status": "running", "ExitCode": 0, "StartedAt": "x"},
        "Config": {
            "Labels": {
                "hestia.enable": "true",
                "com.docker.compose.project": "proj",
                "com.docker.compose.service": "web",
                "com.docker.compose.container-number": "1",
            },
            "ExposedPorts": {"8080/tcp": {}},
        },
        "NetworkSettings": {
            "Networks": {"proj_default": {"IPAddress": "172.20.0.5"}},
            "Ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}]},
        },
    }
    data.update(over)
    return data


def test_inspect_to_info() -> None:
    info = info_from_inspect(_inspect())
    assert info.name == "proj-web-1" and info.running and info.health == "none"
    assert info.lineage == "compose:proj/web/1"
    assert info.created == 1795774830.123456  # 2026-11-27T10:20:30.123456Z
    # Hestia on the host: the published port, 0.0.0.0 read as loopback
    assert info.address == ("127.0.0.1", 49153)
    assert not info.is_self


def test_inspect_address_from_a_shared_network_and_self() -> None:
    info = info_from_inspect(_inspect(), port=None, self_networks=frozenset({"proj_default"}))
    assert info.address == ("172.20.0.5", 8080)  # the only exposed port
    me = info_from_inspect(_inspect(), self_id="a" * 64)
    assert me.is_self


def test_inspect_health() -> None:
    starting = _inspect()
    starting["Config"]["Healthcheck"] = {"Test": ["CMD", "true"]}
    assert info_from_inspect(starting).health == "starting"
    unhealthy = _inspect(
        State={
            "Running": True,
            "Status": "running",
            "Health": {"Status": "unhealthy", "Log": [{"Output": "curl: refused\n"}]},
        }
    )
    info = info_from_inspect(unhealthy)
    assert (info.health, info.health_output) == ("unhealthy", "curl: refused")
    none = _inspect()
    none["Config"]["Healthcheck"] = {"Test": ["NONE"]}
    assert info_from_inspect(none).health == "none"


def test_address_rule() -> None:
    nets = {"a": "10.0.0.2", "b": "10.0.1.2"}
    assert resolve_address(nets, {}, (), None, frozenset({"b"})) == ("10.0.1.2", 80)
    assert resolve_address(nets, {80: ("", 5000)}, (), None, frozenset()) == ("127.0.0.1", 5000)
    assert resolve_address(nets, {}, (3000,), None, frozenset()) == ("10.0.0.2", 3000)
    assert resolve_address(nets, {}, (3000, 4000), 4000, frozenset()) == ("10.0.0.2", 4000)
    assert resolve_address({}, {}, (), None, frozenset()) is None


def test_raw_events() -> None:
    attrs = {"name": "web", "hestia.enable": "true"}
    die = event_from_raw(
        {
            "Type": "container",
            "Action": "die",
            "Actor": {"ID": "x", "Attributes": {**attrs, "exitCode": "137"}},
        }
    )
    assert die is not None and (die.kind, die.exit_code, die.name) == ("die", 137, "web")
    health = event_from_raw(
        {
            "Type": "container",
            "Action": "health_status: healthy",
            "Actor": {"ID": "x", "Attributes": attrs},
        }
    )
    assert health is not None and (health.kind, health.health) == ("health", "healthy")
    renamed = event_from_raw(
        {"Action": "rename", "Actor": {"ID": "x", "Attributes": {"name": "new", "oldName": "/old"}}}
    )
    assert renamed is not None and (renamed.name, renamed.old_name) == ("new", "old")
    assert event_from_raw({"Type": "container", "Action": "exec_start: sh"}) is None
    assert event_from_raw({"Type": "network", "Action": "connect"}) is None


def test_events_resume_from_the_nanosecond() -> None:
    from hestia.backends.docker import _resume_point

    assert _resume_point({"time": 1700000000, "timeNano": 1700000000123456789}) == (
        "1700000000.123456789"
    )
    assert _resume_point({"time": 1700000000}) == "1700000000"
    assert _resume_point({}) is None
