"""The Swarm backend's pure parts: service + tasks -> InstanceInfo (running, address, refusal),
a start's verdict from its tasks, raw service event -> BackendEvent. No engine needed; the
engine paths are in test_swarm_docker.py."""

from __future__ import annotations

from typing import Any

from hestia.backends.swarm import (
    event_from_raw,
    info_from_service,
    refusal,
    service_address,
    start_verdict,
    target_port,
)

SID = "svc0123456789abcdef012345"


def _service(replicas: int | None = 1, *, mode: str = "host", **over: Any) -> dict[str, Any]:
    ports = [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 18080, "PublishMode": mode}]
    spec: dict[str, Any] = {
        "Name": "stack_web",
        "Labels": {"hestia.enable": "true", "hestia.port": "80"},
        "Mode": {"Replicated": {"Replicas": replicas}} if replicas is not None else {"Global": {}},
        "TaskTemplate": {
            "ContainerSpec": {"Image": "web:1"},
            "Networks": [{"Target": "overlay-id-1"}],
        },
        "EndpointSpec": {"Ports": ports},
    }
    data: dict[str, Any] = {
        "ID": SID,
        "CreatedAt": "2026-11-27T10:20:30.123456789Z",
        "Spec": spec,
        "Endpoint": {"Spec": {"Ports": ports}, "Ports": ports},
    }
    data.update(over)
    return data


def _task(
    tid: str,
    state: str,
    desired: str = "running",
    *,
    node: str = "node-a",
    err: str = "",
    exit_code: int = 0,
    published: int | None = 18080,
    at: str = "2026-11-27T10:21:00Z",
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "State": state,
        "Timestamp": at,
        "Message": state,
        "ContainerStatus": {"ExitCode": exit_code},
    }
    if err:
        status["Err"] = err
    if published is not None and state == "running":
        port = {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": published}
        status["PortStatus"] = {"Ports": [{**port, "PublishMode": "host"}]}
    return {"ID": tid, "ServiceID": SID, "NodeID": node, "DesiredState": desired, "Status": status}


def test_scaled_to_zero_is_not_running() -> None:
    info = info_from_service(_service(0), [_task("t0", "shutdown", "shutdown", exit_code=137)])
    assert info.id == SID and info.name == "stack_web"
    assert not info.running and info.status == "scaled to 0"
    assert info.exit_code == 137  # the last task's
    assert info.labels["hestia.enable"] == "true"
    assert info.created == 1795774830.123456
    assert not info.refused and info.health == "none"


def test_running_task_on_a_node_gives_that_nodes_address() -> None:
    tasks = [
        _task("old", "failed", "shutdown", err="task: non-zero exit (1)", exit_code=1),
        _task("t1", "running", node="node-b", published=18081, at="2026-11-27T10:22:00Z"),
    ]
    info = info_from_service(_service(1), tasks, 80, node_addrs={"node-b": "10.0.0.7"})
    assert info.running and info.status == "running (1/1 tasks)"
    assert info.address == ("10.0.0.7", 18081)  # host mode: where the task runs
    assert info.exit_code is None
    assert info.started_at == "2026-11-27T10:22:00Z"


def test_scaled_up_without_a_running_task_is_not_running() -> None:
    info = info_from_service(_service(2), [_task("t1", "preparing")], 80)
    assert not info.running and info.status == "starting"
    # no task runs yet: the endpoint's host and the port the spec publishes
    assert info.address == ("127.0.0.1", 18080)


def test_address_rules() -> None:
    svc = _service(1)
    running = [_task("t1", "running", node="n1")]
    # Hestia on the service's overlay network: its name (the virtual IP)
    assert service_address(svc, running, 80, frozenset({"overlay-id-1"})) == ("stack_web", 80)
    # a node advertising 0.0.0.0, or a remote engine's loopback: the endpoint's host
    assert service_address(svc, running, 80, node_addrs={"n1": "0.0.0.0"}, host="nas") == (
        "nas",
        18080,
    )
    assert service_address(
        svc, running, 80, node_addrs={"n1": "127.0.0.1"}, host="gpubox", local=False
    ) == ("gpubox", 18080)
    # ingress: any node answers, the endpoint's host it is
    ingress = _service(1, mode="ingress")
    assert service_address(ingress, running, 80, host="manager.lan") == ("manager.lan", 18080)
    # another port than the published one: nowhere to go
    assert service_address(svc, running, 8080) is None


def test_target_port_defaults_to_the_only_published_one() -> None:
    svc = _service(1)
    assert target_port(svc, None) == 80
    assert target_port(svc, 9000) == 9000
    svc["Endpoint"] = {"Ports": []}
    svc["Spec"]["EndpointSpec"] = {}
    assert target_port(svc, None) == 80


def test_global_mode_is_refused() -> None:
    svc = _service(None)
    why = refusal(svc)
    assert "global mode" in why and "stack_web" in why and "mode: replicated" in why
    info = info_from_service(svc, [_task("t1", "running")], 80)
    assert info.refused == why
    assert not info.running and info.status == "global"
    assert refusal(_service(1)) == ""
    job = _service(1)
    job["Spec"]["Mode"] = {"ReplicatedJob": {}}
    assert "replicated job mode" in refusal(job)


def test_own_health_follows_the_tasks() -> None:
    assert info_from_service(_service(1), [_task("t", "starting")], own_health=True).health == (
        "starting"
    )
    assert info_from_service(_service(1), [_task("t", "running")], own_health=True).health == (
        "healthy"
    )


def test_start_verdict() -> None:
    history = _task("old", "rejected", "shutdown", err="No such image: web:0")
    # an old failure is not this start's
    assert start_verdict([history, _task("t1", "preparing")], {"old"}) == ("waiting", "")
    assert start_verdict([history, _task("t1", "running")], {"old"}) == ("running", "")
    rejected = _task("t2", "rejected", "shutdown", err="No such image: web:1")
    assert start_verdict([history, rejected], {"old"}) == ("failed", "No such image: web:1")
    failed = _task("t3", "failed", "shutdown", err="task: non-zero exit (3)", exit_code=3)
    assert start_verdict([failed], set()) == ("failed", "task: non-zero exit (3) (exit code 3)")
    pending = _task("t4", "pending", err="no suitable node (host-mode port already in use)")
    assert start_verdict([pending], set()) == (
        "waiting",
        "no suitable node (host-mode port already in use)",
    )


def test_service_events() -> None:
    raw = {
        "Type": "service",
        "Action": "update",
        "Actor": {"ID": SID, "Attributes": {"name": "stack_web", "replicas.new": "0"}},
        "timeNano": 1795799936493656571,
    }
    ev = event_from_raw(raw, {"hestia.enable": "true"})
    assert ev is not None
    assert (ev.kind, ev.id, ev.name) == ("update", SID, "stack_web")
    assert ev.labels["hestia.enable"] == "true" and ev.labels["replicas.new"] == "0"
    removed = event_from_raw({**raw, "Action": "remove"})
    assert removed is not None and removed.kind == "destroy"
    created = event_from_raw({**raw, "Action": "create"})
    assert created is not None and created.kind == "create"
    assert event_from_raw({**raw, "Type": "container"}) is None
    assert event_from_raw({**raw, "Action": "exec_start"}) is None


def test_a_swarm_tasks_container_events_are_left_to_swarm() -> None:
    from hestia.backends.docker import event_from_raw as container_event

    raw = {
        "Type": "container",
        "Action": "start",
        "Actor": {
            "ID": "c" * 64,
            "Attributes": {
                "name": "stack_web.1.abc",
                "hestia.enable": "true",
                "com.docker.swarm.service.id": SID,
            },
        },
    }
    assert container_event(raw) is None  # the Docker backend never follows it
    del raw["Actor"]["Attributes"]["com.docker.swarm.service.id"]  # type: ignore[index]
    assert container_event(raw) is not None
