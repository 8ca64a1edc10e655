"""The online worker's lease (one worker per domain), the operator controls in control.json (pin,
freeze, rollback), the lineage view, and their `wesam adapters` commands, on tiny generated
registries (sam-micro adapters) and real processes for the lease."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from wesam.adapters.artifact import save_adapter
from wesam.adapters.errors import AdapterError
from wesam.adapters.lora import LoraConfig, add_adapter
from wesam.adapters.online import control
from wesam.adapters.online.control import DomainControl, read_control
from wesam.adapters.online.lease import LOCK_FILE, DomainLease, LeaseHeld, LeaseLost
from wesam.adapters.registry import Registry
from wesam.cli import exit_code, main
from wesam.errors import WesamError
from wesam.sam.zoo import LoadedModel, resolve_model, save_safetensors

ROOT = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """sam-micro from a file (so it has a SHA-256) with one LoRA adapter "a" to save."""
    path = tmp_path_factory.mktemp("base") / "micro.safetensors"
    m = resolve_model("sam-micro", seed=0)
    save_safetensors(m.sam, path, name="sam-micro", config=m.config)
    loaded = resolve_model(str(path))
    add_adapter(loaded.sam, "a", LoraConfig(rank=2))
    return loaded


def publish(reg: Registry, model: LoadedModel, domain: str, *, parent: str | None = None,
            lineage: bool = True, gate: bool = True, count: int = 10, activate: bool = True) -> int:
    """Publish the next version; with ``lineage`` as the worker writes it, else as `wesam adapt`."""
    extra: dict[str, Any] = {"method": "wesam"}
    if lineage:
        # As the worker writes it: no golden set, no measured mIoU ("after": null).
        extra = {"method": "online", "metrics": {"before": None, "after": None}, "lineage": {
            "parent": parent, "pinned": None,
            "samples": {"count": count, "fingerprint": "ab" * 8, "first": 1.0, "last": 2.0},
            "gate": {"pass": gate, "golden_delta": 0.01}, "round": count // 10,
            "worker": {"host": "test", "pid": 1}}}
    with reg.staging(domain) as staged:
        save_adapter(staged, model, "a", domain=domain, extra=extra)
    return reg.publish(staged, domain, activate=activate).version


@pytest.fixture()
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def run_cli(capsys: pytest.CaptureFixture[str], reg: Registry, *args: str) -> tuple[int, str, str]:
    code = main(["adapters", "--registry", str(reg.root), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- lease -----------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from wesam.adapters.online.lease import DomainLease
    lease = DomainLease(sys.argv[1], sys.argv[2]).acquire()
    print("held", flush=True)
    sys.stdin.read()  # hold until killed (or stdin closes)
""")


@pytest.fixture()
def holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the lease of domain ``polyp`` in ``tmp_path/registry``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "registry"), "polyp"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def test_second_worker_in_another_process_is_refused_with_the_holder(tmp_path: Path,
                                                                        holder: subprocess.Popen) -> None:
    lease = DomainLease(tmp_path / "registry", "polyp")
    with pytest.raises(LeaseHeld) as refused:
        lease.acquire()
    assert not lease.held
    err = refused.value
    assert isinstance(err, WesamError) and err.kind == "lease_held" and exit_code(err) == 75
    assert err.holder["pid"] == holder.pid and err.holder["host"] == socket.gethostname()
    assert err.holder["since"] and err.holder["domain"] == "polyp"
    assert f"pid {holder.pid}" in str(err) and "polyp" in str(err)
    assert lease.read_holder()["pid"] == holder.pid
    # Other domains are independent.
    with DomainLease(tmp_path / "registry", "skin") as other:
        assert other.held


def test_kill_9_of_the_holder_frees_the_lease(tmp_path: Path, holder: subprocess.Popen) -> None:
    lease = DomainLease(tmp_path / "registry", "polyp")
    with pytest.raises(LeaseHeld):
        lease.acquire()
    os.kill(holder.pid, signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL  # exited: the kernel closed its descriptors
    with lease:
        assert lease.held
        lease.check()
        assert lease.read_holder()["pid"] == os.getpid()
    assert not lease.held


def test_one_holder_per_domain_within_a_process_too(tmp_path: Path) -> None:
    first = DomainLease(tmp_path, "polyp").acquire()
    assert first.acquire() is first  # re-acquiring what we hold is a no-op
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        DomainLease(tmp_path, "polyp").acquire()
    first.release()
    assert not first.held and (tmp_path / "polyp" / LOCK_FILE).read_text() == ""  # no stale holder
    first.release()  # a no-op when not held
    with DomainLease(tmp_path, "polyp") as second:
        assert second.held


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_check_detects_a_replaced_or_removed_lock_file(tmp_path: Path, how: str) -> None:
    lease = DomainLease(tmp_path, "polyp").acquire()
    lease.check()
    path = tmp_path / "polyp" / LOCK_FILE
    if how == "replaced":
        other = tmp_path / "other.lock"
        other.write_text("")
        os.replace(other, path)
    else:
        path.unlink()
    with pytest.raises(LeaseLost, match=how) as lost:
        lease.check()
    assert lost.value.kind == "lease_lost" and exit_code(lost.value) == 75
    # ...because a second worker can now lock the new file: exactly what check() guards against.
    with DomainLease(tmp_path, "polyp") as intruder:
        assert intruder.held
    lease.release()
    with pytest.raises(LeaseLost, match="not held"):
        lease.check()


def test_lease_refuses_a_bad_domain_name(tmp_path: Path) -> None:
    with pytest.raises(AdapterError):
        DomainLease(tmp_path, "../escape")
    assert list(tmp_path.iterdir()) == []


# -- control.json ----------------------------------------------------------------------------------

def test_pin_unpin_freeze_unfreeze(reg: Registry, model: LoadedModel) -> None:
    publish(reg, model, "polyp", lineage=False)
    publish(reg, model, "polyp", parent="polyp@v1")
    assert read_control(reg, "polyp") == DomainControl(pinned=None, frozen=False, reason=None, updated="")

    state = control.pin(reg, "polyp", 1)
    assert state.pinned == 1 and not state.frozen and state.updated
    assert read_control(reg, "polyp") == state
    on_disk = json.loads((reg.root / "polyp" / "control.json").read_text())
    assert on_disk == {"pinned": 1, "frozen": False, "reason": None, "updated": state.updated}
    with pytest.raises(AdapterError, match=r"cannot pin polyp@v7.*versions: v1, v2"):
        control.pin(reg, "polyp", 7)
    assert read_control(reg, "polyp").pinned == 1  # a refused pin changes nothing

    state = control.freeze(reg, "polyp", reason="  labels from\nclient 42  ")
    assert (state.pinned, state.frozen, state.reason) == (1, True, "labels from client 42")
    state = control.unpin(reg, "polyp")
    assert (state.pinned, state.frozen) == (None, True)  # each control changes only its own field
    state = control.unfreeze(reg, "polyp")
    assert (state.pinned, state.frozen, state.reason) == (None, False, None)
    assert read_control(reg, "polyp") == state
    assert reg.active_version("polyp") == 2  # none of these changes what is served


def test_controls_need_an_existing_domain(reg: Registry, model: LoadedModel) -> None:
    publish(reg, model, "polyp", lineage=False)
    with pytest.raises(AdapterError, match=r"no domain 'polpy'.*domains: polyp"):
        control.freeze(reg, "polpy")
    assert not (reg.root / "polpy").exists()
    with pytest.raises(AdapterError):
        control.freeze(reg, "bad name")


@pytest.mark.parametrize("text, problem", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"pinned": "v2"}', "'pinned' must be a version number"),
    ('{"pinned": 0}', "'pinned' must be a version number"),
    ('{"frozen": "yes"}', "'frozen' must be true or false"),
    ('{"reason": 5}', "'reason' must be text"),
    ('{"frozen": true, "frozn": true}', "unknown keys"),
])
def test_malformed_control_file_is_an_error_naming_it(reg: Registry, model: LoadedModel, text: str,
                                                       problem: str) -> None:
    publish(reg, model, "polyp", lineage=False)
    path = reg.root / "polyp" / "control.json"
    path.write_text(text)
    with pytest.raises(AdapterError, match=problem) as err:
        read_control(reg, "polyp")
    assert str(path) in str(err.value)
    with pytest.raises(AdapterError, match=problem):  # never overwritten as if it were empty
        control.freeze(reg, "polyp")
    assert path.read_text() == text


# -- rollback --------------------------------------------------------------------------------------

def test_rollback_follows_the_lineage_parent_and_freezes(reg: Registry, model: LoadedModel) -> None:
    publish(reg, model, "polyp", lineage=False)  # v1: wesam adapt
    publish(reg, model, "polyp", parent="polyp@v1")  # v2
    publish(reg, model, "polyp", parent="polyp@v1")  # v3: the worker reset to v1 (pinned) before it
    assert reg.active_version("polyp") == 3
    assert control.rollback_target(reg, "polyp") == 1
    assert control.rollback(reg, "polyp") == 1  # the parent, not v2 (merely the previous number)
    assert reg.active_version("polyp") == 1
    state = read_control(reg, "polyp")
    assert state.frozen and state.reason == "rolled back from v3 to v1"


def test_rollback_without_lineage_takes_the_previous_version(reg: Registry, model: LoadedModel) -> None:
    for _ in range(3):
        publish(reg, model, "polyp", lineage=False)
    reg.activate("polyp", 2)
    assert control.rollback(reg, "polyp", freeze=False) == 1
    assert reg.active_version("polyp") == 1 and not read_control(reg, "polyp").frozen
    with pytest.raises(AdapterError, match="cannot roll back polyp@v1"):
        control.rollback(reg, "polyp")
    assert reg.active_version("polyp") == 1 and not read_control(reg, "polyp").frozen  # refused: unchanged


def test_rollback_when_the_parent_was_deleted(reg: Registry, model: LoadedModel) -> None:
    import shutil

    publish(reg, model, "polyp", lineage=False)  # v1
    publish(reg, model, "polyp", parent="polyp@v1")  # v2
    publish(reg, model, "polyp", parent="polyp@v2")  # v3
    shutil.rmtree(reg.path("polyp", 2))
    assert control.rollback(reg, "polyp", reason="bad round") == 1  # newest older version
    assert read_control(reg, "polyp").reason == "bad round"


def test_rollback_refused_when_there_is_nothing_to_roll_back_to(reg: Registry, model: LoadedModel) -> None:
    with pytest.raises(AdapterError, match="no version"):
        control.rollback(reg, "polyp")
    publish(reg, model, "polyp", parent=None)  # a worker's first version, trained from the base
    with pytest.raises(AdapterError, match="no parent in the registry and no older version"):
        control.rollback(reg, "polyp")
    assert not (reg.root / "polyp" / "control.json").exists()


# -- lineage ---------------------------------------------------------------------------------------

def test_registry_lineage_and_chain(reg: Registry, model: LoadedModel) -> None:
    publish(reg, model, "polyp", lineage=False)  # v1
    publish(reg, model, "polyp", parent="polyp@v1", count=20)  # v2
    publish(reg, model, "polyp", parent="polyp@v2", count=30, gate=False, activate=False)  # v3, not active
    publish(reg, model, "polyp", parent="polyp@v2", count=40)  # v4
    assert reg.lineage("polyp", 1) is None
    assert reg.lineage("polyp", 4)["parent"] == "polyp@v2" and reg.lineage("polyp", 4)["samples"]["count"] == 40
    with pytest.raises(AdapterError, match="not in registry"):
        reg.lineage("polyp", 9)

    chain = control.lineage_chain(reg, "polyp")
    assert [r["version"] for r in chain] == [4, 2, 1]
    assert [(r["parent"], r["samples"], r["gate"], r["method"]) for r in chain] == [
        ("polyp@v2", 40, True, "online"), ("polyp@v1", 20, True, "online"), (None, None, None, "wesam")]
    assert all(r["created"] for r in chain)
    assert [r["version"] for r in control.lineage_chain(reg, "polyp", 3)] == [3, 2, 1]
    assert control.lineage_chain(reg, "polyp", 3)[0]["gate"] is False

    # A parent deleted from the registry ends the chain with a "missing" row.
    import shutil
    shutil.rmtree(reg.path("polyp", 2))
    assert control.lineage_chain(reg, "polyp") == [control.lineage_chain(reg, "polyp")[0],
                                                   {"version": 2, "adapter": "polyp@v2", "missing": True}]


def test_malformed_lineage_is_an_error(reg: Registry, model: LoadedModel) -> None:
    with reg.staging("polyp") as staged:
        save_adapter(staged, model, "a", domain="polyp", extra={"lineage": "polyp@v0"})
    reg.publish(staged, "polyp")
    with pytest.raises(AdapterError, match="'lineage' must be an object"):
        reg.lineage("polyp", 1)


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_controls_end_to_end(reg: Registry, model: LoadedModel, capsys: pytest.CaptureFixture[str]) -> None:
    publish(reg, model, "polyp", lineage=False)  # v1
    publish(reg, model, "polyp", parent="polyp@v1", count=20)  # v2
    publish(reg, model, "polyp", parent="polyp@v2", count=30, gate=True)  # v3

    code, out, _ = run_cli(capsys, reg, "pin", "polyp", "v2")
    assert code == 0 and "v2" in out and read_control(reg, "polyp").pinned == 2
    code, out, _ = run_cli(capsys, reg, "freeze", "polyp", "--reason", "audit")
    assert code == 0 and read_control(reg, "polyp").frozen and read_control(reg, "polyp").reason == "audit"

    code, out, _ = run_cli(capsys, reg, "list", "--json")
    rows = {r["adapter"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {"polyp@v1", "polyp@v2", "polyp@v3"}
    assert [rows[a]["pinned"] for a in sorted(rows)] == [False, True, False]
    assert all(r["frozen"] for r in rows.values()) and rows["polyp@v3"]["active"]
    assert rows["polyp@v3"]["parent"] == "polyp@v2" and rows["polyp@v1"]["parent"] is None
    code, out, _ = run_cli(capsys, reg, "list")
    assert "polyp@v2" in out and "[pinned] [frozen]" in out

    code, out, _ = run_cli(capsys, reg, "lineage", "polyp", "--json")
    view = json.loads(out)
    assert code == 0 and (view["active"], view["pinned"], view["frozen"], view["reason"]) == (3, 2, True, "audit")
    assert [(r["version"], r["samples"], r["gate"]) for r in view["chain"]] == [(3, 30, True), (2, 20, True),
                                                                                (1, None, None)]
    code, out, _ = run_cli(capsys, reg, "lineage", "polyp")
    lines = out.splitlines()
    assert lines[0] == "polyp: active v3, pinned v2, frozen (audit)"
    assert "parent=polyp@v2" in lines[1] and "samples=30" in lines[1] and "gate=pass" in lines[1]
    assert "root (no lineage)" in lines[3]

    code, out, _ = run_cli(capsys, reg, "unfreeze", "polyp")
    assert code == 0 and not read_control(reg, "polyp").frozen
    code, out, _ = run_cli(capsys, reg, "rollback", "polyp")
    assert code == 0 and "v3 -> v2" in out and "unfreeze" in out
    assert reg.active_version("polyp") == 2 and read_control(reg, "polyp").frozen
    code, out, _ = run_cli(capsys, reg, "rollback", "polyp", "--no-freeze")
    assert code == 0 and reg.active_version("polyp") == 1
    code, _, err = run_cli(capsys, reg, "rollback", "polyp")
    assert code == 2 and "cannot roll back polyp@v1" in err
    code, out, _ = run_cli(capsys, reg, "unpin", "polyp")
    assert code == 0 and read_control(reg, "polyp").pinned is None

    code, _, err = run_cli(capsys, reg, "pin", "polyp", "v9")
    assert code == 2 and "cannot pin polyp@v9" in err
    code, _, err = run_cli(capsys, reg, "freeze", "polyp@v2")
    assert code == 2 and "without a version" in err
    (reg.root / "polyp" / "control.json").write_text("{")
    code, _, err = run_cli(capsys, reg, "list")
    assert code == 2 and "control.json" in err


def test_cli_as_a_subprocess_with_registry_after_the_subcommand(reg: Registry, model: LoadedModel) -> None:
    publish(reg, model, "polyp", lineage=False)
    publish(reg, model, "polyp", parent="polyp@v1")
    r = subprocess.run([sys.executable, "-m", "wesam.cli", "adapters", "rollback", "polyp", "--registry",
                        str(reg.root)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert reg.active_version("polyp") == 1 and read_control(reg, "polyp").frozen
