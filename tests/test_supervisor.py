"""The supervisor driven in memory: a fake clock, a fake TokenClient, an in-memory sink and
state file. Each test runs in milliseconds: no real IMS, no sleeps, no polling. The
end-to-end behaviour (real sockets, the real fake IMS) is in test_daemon and test_faults."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from imsd.catalog import Added, Changed, Failed
from imsd.flows import Flow
from imsd.model import (
    Credential,
    CredentialError,
    CredentialState,
    Grant,
    ImsError,
    ImsErrorKind,
    Secret,
)
from imsd.persist import StateFile, Stored
from imsd.registry import load_registry
from imsd.schedule import RefreshPolicy
from imsd.scheduler import Record
from imsd.supervisor import Supervisor

pytestmark = pytest.mark.anyio

DAY = 86400.0
T0 = 1_000_000.0
ORG = "0123456789ABCDEF01234567@AdobeOrg"


def cred(name: str = "alpha", secret: str = "s1") -> Credential:
    return Credential(
        name=name,
        path=Path(f"/c/{name}.toml"),
        auth="oauth_server_to_server",
        client_id="cid",
        client_secret=Secret(secret),
        org_id=ORG,
        scopes=("openid",),
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeIms:
    """Answers each flow with a token naming the secret it was asked with, or with the
    queued errors; ``gate`` (when set) holds every answer until it is set."""

    clock: Clock
    life: float = DAY
    errors: list[ImsError] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    gate: anyio.Event | None = None

    async def run(self, flow: Flow) -> Grant:
        request = next(flow)
        secret = str(request.form["client_secret"])
        self.calls.append(secret)
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        now = self.clock()
        return Grant(Secret(f"tok-{secret}-{len(self.calls)}"), "bearer", now, now + self.life)


class MemorySink:
    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.fail: OSError | None = None

    def write(self, name: str, files: Mapping[str, bytes]) -> None:
        if self.fail is not None:
            raise self.fail
        self.files[name] = dict(files)

    def remove(self, name: str) -> None:
        self.files.pop(name, None)

    def in_memory(self) -> bool:
        return True

    def token(self, name: str) -> str:
        return self.files[name]["token"].decode()


class MemoryState:
    def __init__(self, entries: dict[str, Stored] | None = None) -> None:
        self.entries = dict(entries or {})
        self.path = Path("/state/state.db")
        self.puts: list[set[str]] = []  # the names each incremental save was given

    def load(self) -> dict[str, Stored]:
        return dict(self.entries)

    def save(self, entries: Mapping[str, Stored]) -> None:
        self.entries = dict(entries)

    def put(self, changes: Mapping[str, Stored | None]) -> bool:
        self.puts.append(set(changes))
        for name, stored in changes.items():
            if stored is None:
                self.entries.pop(name, None)
            else:
                self.entries[name] = stored
        return True


@dataclass
class World:
    clock: Clock
    ims: FakeIms
    sink: MemorySink
    state: MemoryState
    start: Callable[..., Any]


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = Clock()
    ims = FakeIms(clock)
    sink = MemorySink()
    state = MemoryState()
    products = load_registry().products
    async with anyio.create_task_group() as tg:

        async def start(**kw: Any) -> Supervisor:
            sup = Supervisor(
                client=ims,
                sink=sink,
                products=products,
                policy=kw.pop("policy", RefreshPolicy()),
                clock=clock,
                rand=lambda: 0.5,
                state=cast(StateFile, kw.pop("state", state)),
                **kw,
            )
            await tg.start(sup.run)
            return sup

        yield World(clock, ims, sink, state, start)
        tg.cancel_scope.cancel()


def record(sup: Supervisor, name: str = "alpha") -> Record:
    rec = sup.store.get(name)
    assert rec is not None
    return rec


async def settle(sup: Supervisor) -> None:
    """Let everything that is due at the fake clock's now run to completion."""
    await sup.run_due()


# -- single flight, failures, retries --------------------------------------------------------


async def test_a_thousand_forced_refreshes_make_one_request(world: World) -> None:
    sup = await world.start()
    await sup.apply([Added(cred())])
    await sup.wait_first_attempts()
    world.ims.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(sup.refresh, "alpha")
        await anyio.wait_all_tasks_blocked()
        world.ims.gate.set()
    assert world.ims.calls == ["s1", "s1"]  # the first fetch, then one for the thousand
    assert world.sink.token("alpha") == "tok-s1-2"


async def test_outage_across_two_windows_serves_the_token_until_it_expires(
    world: World,
) -> None:
    world.ims.life = 3600.0
    sup = await world.start(policy=RefreshPolicy(min_margin=60.0))
    await sup.apply([Added(cred())])
    await sup.wait_first_attempts()
    first = world.sink.token("alpha")
    rec = sup.store.get("alpha")
    assert rec is not None
    world.ims.errors = [ImsError(ImsErrorKind.TRANSIENT, "http_503", status=503)] * 1000
    # Through the refresh window and past it: each due retry fails, the token is served.
    assert rec.grant is not None
    while world.clock.now < rec.grant.expires_at:
        world.clock.now = max(world.clock.now + 1, record(sup).wake_at())
        await settle(sup)
        current = sup.store.get("alpha")
        assert current is not None
        assert world.sink.token("alpha") == first  # never replaced by nothing
        if world.clock.now < rec.grant.expires_at:
            assert current.state(world.clock.now) is CredentialState.STALE
    assert record(sup).state(world.clock.now) is CredentialState.EXPIRED
    failures = len(world.ims.calls) - 1
    assert 3 <= failures < 40  # backoff, not a storm
    world.ims.errors = []
    world.clock.now = record(sup).wake_at()
    await settle(sup)
    assert record(sup).state(world.clock.now) is CredentialState.VALID
    assert world.sink.token("alpha") != first


async def test_retry_after_is_honoured(world: World) -> None:
    world.ims.errors = [ImsError(ImsErrorKind.THROTTLED, "too_many_requests", retry_after=30.0)]
    sup = await world.start()
    await sup.apply([Added(cred())])
    await sup.wait_first_attempts()
    rec = sup.store.get("alpha")
    assert rec is not None
    assert rec.due == T0 + 30.0
    world.clock.now = T0 + 29.0
    await settle(sup)
    assert len(world.ims.calls) == 1
    world.clock.now = T0 + 30.0
    await settle(sup)
    assert len(world.ims.calls) == 2
    assert world.sink.token("alpha") == "tok-s1-2"


async def test_a_failed_write_is_retried_without_ims(world: World) -> None:
    world.sink.fail = OSError(28, "No space left on device")
    sup = await world.start()
    await sup.apply([Added(cred())])
    await sup.wait_first_attempts()
    rec = sup.store.get("alpha")
    assert rec is not None
    assert rec.write_pending
    assert rec.last_error is not None
    assert "No space left" in rec.last_error
    world.sink.fail = None
    world.clock.now = rec.write_due
    await settle(sup)
    rec = sup.store.get("alpha")
    assert rec is not None
    assert not rec.write_pending
    assert rec.last_error is None
    assert world.sink.token("alpha") == "tok-s1-1"
    assert world.ims.calls == ["s1"]


async def test_a_clock_jump_past_the_refresh_refreshes(world: World) -> None:
    sup = await world.start()
    await sup.apply([Added(cred())])
    await sup.wait_first_attempts()
    world.clock.now += 2 * DAY  # a suspended laptop wakes up
    await settle(sup)
    assert world.ims.calls == ["s1", "s1"]
    assert record(sup).state(world.clock.now) is CredentialState.VALID


# -- the four defects of the earlier core ----------------------------------------------------


async def test_an_identity_change_is_not_undone_by_a_restart(world: World) -> None:
    """The new version's identity must never be stored beside the old version's token."""
    sup = await world.start()
    await sup.apply([Added(cred("alpha", "s1")), Added(cred("beta"))])
    await sup.wait_first_attempts()
    world.ims.errors = [ImsError(ImsErrorKind.TRANSIENT, "http_503", status=503)]
    await sup.apply([Changed(cred("alpha", "s1"), cred("alpha", "s2"))])
    await settle(sup)  # the new secret's fetch failed
    await sup.refresh("beta")  # another credential's success saves the state
    await sup._save_state()
    stored = world.state.entries.get("alpha")  # the old token is not stored as the new one
    assert stored is None or stored.identity != cred("alpha", "s2").identity or not stored.grant
    # A restart with the new file fetches under the new identity.
    calls = len(world.ims.calls)
    sup2 = await world.start(state=MemoryState(world.state.entries))
    await sup2.apply([Added(cred("alpha", "s2"))])
    await sup2.wait_first_attempts()
    assert world.ims.calls[calls:] == ["s2"]


async def test_a_restart_during_an_outage_keeps_a_token_inside_its_margin(world: World) -> None:
    c = cred()
    g = Grant(Secret("tok-saved"), "bearer", T0 - DAY + 300, T0 + 300)  # five minutes left
    world.ims.errors = [ImsError(ImsErrorKind.TRANSIENT, "http_503", status=503)]
    sup = await world.start(state=MemoryState({"alpha": Stored(c.identity, g)}))
    await sup.apply([Added(c)])
    await sup.wait_first_attempts()
    await settle(sup)
    rec = sup.store.get("alpha")
    assert rec is not None
    assert world.ims.calls == ["s1"]  # due at once, and failed
    assert rec.state(world.clock.now) is CredentialState.STALE  # still served
    assert world.sink.token("alpha") == "tok-saved"


async def test_a_file_broken_across_a_restart_keeps_its_stored_token(world: World) -> None:
    c = cred()
    g = Grant(Secret("tok-saved"), "bearer", T0 - 3600, T0 + DAY - 3600)
    state = MemoryState({"alpha": Stored(c.identity, g)})
    sup = await world.start(state=state)
    error = CredentialError(c.path, "Field required", field="client_id")
    await sup.apply([Failed(c.path, "alpha", error), Added(cred("beta"))])
    await sup.wait_first_attempts()
    await sup._save_state()  # beta's token is saved: alpha's must stay
    assert "alpha" in state.entries
    await sup.apply([Added(c)])  # the file is fixed
    await sup.wait_first_attempts()
    assert world.ims.calls == ["s1"]  # beta's only: alpha's token was reused
    assert world.sink.token("alpha") == "tok-saved"


async def test_an_edit_during_a_refresh_is_not_lost(world: World) -> None:
    sup = await world.start()
    await sup.apply([Added(cred("alpha", "s1"))])
    await sup.wait_first_attempts()
    world.ims.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.refresh, "alpha")
        await anyio.wait_all_tasks_blocked()
        await sup.apply([Changed(cred("alpha", "s1"), cred("alpha", "s2"))])
        world.ims.gate.set()
    await settle(sup)
    rec = sup.store.get("alpha")
    assert rec is not None
    assert world.ims.calls == ["s1", "s1", "s2"]  # the edit's fetch followed the old one
    assert world.sink.token("alpha") == "tok-s2-3"
    assert rec.serving(cred("alpha", "s2").identity) is rec.grant


async def test_a_removed_credential_leaves_no_work(world: World) -> None:
    from imsd.catalog import Removed

    sup = await world.start()
    await sup.apply([Added(cred())])
    await sup.wait_first_attempts()
    await sup.apply([Removed(cred())])
    assert "alpha" not in sup.store
    assert "alpha" not in world.sink.files
    assert sup.pending_timers == 0


async def test_a_save_after_the_first_writes_only_what_changed(world: World) -> None:
    from imsd.catalog import Removed

    sup = await world.start()
    await sup.apply([Added(cred(f"c{i}")) for i in range(50)])
    await sup.wait_first_attempts()
    await sup._save_state()
    assert set(world.state.entries) == {f"c{i}" for i in range(50)}
    world.state.puts.clear()
    await sup.refresh("c7")
    await sup._save_state()
    assert world.state.puts[-1] == {"c7"}
    assert world.state.entries["c7"].grant == record(sup, "c7").grant
    await sup.apply([Removed(cred("c8"))])
    await sup._save_state()
    assert world.state.puts[-1] == {"c8"}
    assert "c8" not in world.state.entries
