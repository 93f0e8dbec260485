from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from imsd.catalog import Added, Catalog, Changed, Failed, Removed, Resolved, ScanResult
from imsd.model import Credential, CredentialError, Secret


def cred(name: str, path: str, digest: str = "d1") -> Credential:
    return Credential(
        name=name,
        path=Path(path),
        auth="oauth_server_to_server",
        client_id="c",
        client_secret=Secret("s"),
        org_id="o@AdobeOrg",
        scopes=("openid",),
        digest=digest,
    )


def err(path: str, msg: str = "broken") -> CredentialError:
    return CredentialError(path, msg, field="x")


def test_add_change_remove() -> None:
    cat = Catalog()
    a1 = cred("a", "/d/a.toml")
    assert cat.apply({Path("/d/a.toml"): [a1]}) == [Added(a1)]
    assert cat.apply({Path("/d/a.toml"): [a1]}) == []
    a2 = cred("a", "/d/a.toml", "d2")
    assert cat.apply({Path("/d/a.toml"): [a2]}) == [Changed(a1, a2)]
    assert cat.apply({}) == [Removed(a2)]


def test_broken_file_keeps_last_good_then_recovers() -> None:
    cat = Catalog()
    a = cred("a", "/d/a.toml")
    cat.apply({Path("/d/a.toml"): [a]})
    e = err("/d/a.toml")
    assert cat.apply({Path("/d/a.toml"): e}) == [Failed(Path("/d/a.toml"), "a", e, a)]
    assert cat.credentials == {"a": a}
    assert cat.apply({Path("/d/a.toml"): e}) == []  # re-scans are silent
    # Fixed back to the same content: the error clears.
    assert cat.apply({Path("/d/a.toml"): [a]}) == [Changed(a, a), Resolved(Path("/d/a.toml"))]


def test_never_valid_file_and_its_deletion() -> None:
    cat = Catalog()
    e = err("/d/b.toml")
    assert cat.apply({Path("/d/b.toml"): e}) == [Failed(Path("/d/b.toml"), None, e)]
    assert cat.apply({}) == [Resolved(Path("/d/b.toml"))]


def test_duplicate_names_first_path_wins() -> None:
    cat = Catalog()
    a, b = cred("x", "/d/a.toml"), cred("x", "/d/b.json")
    events = cat.apply({Path("/d/b.json"): [b], Path("/d/a.toml"): [a]})
    assert events[0] == Added(a)
    assert isinstance(events[1], Failed)
    assert events[1].path == Path("/d/b.json")
    assert "duplicate name 'x'" in str(events[1].error)


def test_rename_inside_file_is_remove_plus_add() -> None:
    cat = Catalog()
    a = cred("a", "/d/f.toml")
    cat.apply({Path("/d/f.toml"): [a]})
    b = cred("b", "/d/f.toml", "d2")
    assert cat.apply({Path("/d/f.toml"): [b]}) == [Removed(a), Added(b)]


_paths = st.sampled_from(["/d/a.toml", "/d/b.toml", "/d/c.json"])
_results = st.one_of(
    st.builds(lambda n, d: ("ok", n, d), st.sampled_from(["a", "b", "c"]), st.sampled_from("12")),
    st.just(("err", "", "")),
)


@given(st.lists(st.dictionaries(_paths, _results), max_size=6))
def test_invariants(scans: list[dict[str, tuple[str, str, str]]]) -> None:
    cat = Catalog()
    good: dict[Path, list[Credential]] = {}
    for raw in scans:
        scan: dict[Path, ScanResult] = {}
        for raw_path, (kind, name, digest) in raw.items():
            scan[Path(raw_path)] = [cred(name, raw_path, digest)] if kind == "ok" else err(raw_path)
        cat.apply(scan)
        assert cat.apply(scan) == []  # idempotent
        for path, r in scan.items():
            if not isinstance(r, CredentialError):
                good[path] = list(r)
        good = {k: v for k, v in good.items() if k in scan}
        expected: dict[str, Credential] = {}
        for path in sorted(good):
            for c in good[path]:
                expected.setdefault(c.name, c)
        assert cat.credentials == expected
