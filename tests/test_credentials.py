from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imsd.credentials import inside_roots, parse_credentials, resolve_roots
from imsd.model import CredentialError

ORG = "0123456789ABCDEF01234567@AdobeOrg"
SECRET = "p8e-VerySecretValue-0123456789"
BASE: dict[str, Any] = {
    "auth": "oauth_server_to_server",
    "client_id": "cid",
    "client_secret": SECRET,
    "org_id": ORG,
    "scopes": ["openid", "AdobeID"],
}


def parse(obj: dict[str, Any], name: str = "c.json", **kw: Any) -> Any:
    path = Path("/creds") / name
    return parse_credentials(path, json.dumps(obj).encode(), env=kw.pop("env", {}), **kw)


def test_native_json_defaults() -> None:
    [c] = parse(BASE)
    assert c.name == "c"
    assert c.client_secret.reveal() == SECRET
    assert c.products == ("generic",)
    assert c.outputs == ("token", "json", "headers", "env")
    assert c.ims_url == "https://ims-na1.adobelogin.com"
    assert SECRET not in repr(c)


def test_native_toml_with_products_and_options(tmp_path: Path) -> None:
    text = (
        'client_id = "cid"\nclient_secret_env = "S"\n'
        f'org_id = "{ORG}"\nscopes = "openid, AdobeID"\nproducts = ["aep"]\n'
        '[product.aep]\nsandbox = "dev"\n[extra_headers]\n"x-team" = "a"\n'
    )
    [c] = parse_credentials(tmp_path / "aep.toml", text.encode(), env={"S": SECRET})
    assert c.scopes == ("openid", "AdobeID")
    assert c.product_options == {"aep": {"sandbox": "dev"}}
    assert c.extra_headers == {"x-team": "a"}


def test_secret_file_relative_to_credentials_directory(tmp_path: Path) -> None:
    creds_dir = tmp_path / "systemd-creds"
    creds_dir.mkdir()
    (creds_dir / "aep.secret").write_text(SECRET + "\n")
    obj = {**BASE, "client_secret": None, "client_secret_file": "aep.secret"}
    del obj["client_secret"]
    [c] = parse(obj, credentials_directory=creds_dir)
    assert c.client_secret.reveal() == SECRET


def test_digest_changes_with_the_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("one")
    obj = {k: v for k, v in BASE.items() if k != "client_secret"}
    obj["client_secret_file"] = str(secret)
    roots = resolve_roots([tmp_path])
    [a] = parse(obj, secret_roots=roots)
    secret.write_text("two")
    [b] = parse(obj, secret_roots=roots)
    assert a.digest != b.digest
    assert a.identity != b.identity


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        ({"org_id": "nope"}, "org_id", "@AdobeOrg"),
        ({"client_id": ""}, "client_id", ""),
        ({"scopes": []}, "scopes", "at least one scope"),
        ({"scopes": ["a b"]}, "scopes", "no commas or spaces"),
        ({"ims_url": "http://ims.example.com"}, "ims_url", "https"),
        ({"ims_url": "ftp://127.0.0.1"}, "ims_url", "https"),
        ({"products": ["aep", "aep"]}, "products", "twice"),
        ({"outputs": ["tokens"]}, "outputs.0", ""),
        ({"product": {"cja": {}}}, "product", "not in products"),
        ({"clientid": "x"}, "clientid", "unknown key 'clientid': did you mean 'client_id'?"),
        ({"client_secret_env": "X"}, "client_secret", "exactly one"),
        ({"name": "../evil"}, "name", "A-Z"),
        ({"auth": "password"}, "auth", ""),
        ({"auth": "jwt"}, "technical_account_id", "jwt"),
        ({"extra_headers": {"x-a": "b\r\nInjected: 1"}}, "extra_headers", "single-line"),
    ],
)
def test_errors_name_file_and_field_never_the_secret(
    change: dict[str, Any], field: str, needle: str
) -> None:
    with pytest.raises(CredentialError) as err:
        parse({**BASE, **change})
    assert err.value.field == field
    assert err.value.path == "/creds/c.json"
    assert str(err.value).startswith(f"/creds/c.json: {field}: ")
    assert needle in str(err.value)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("https://user:hunter2-pw@ims.example.com", "user:password@"),
        ("https://hunter2-pw@ims.example.com", "user:password@"),
        ("https://ims.example.com/?pw=hunter2-pw", "query"),
        ("https://ims.example.com/#hunter2-pw", "fragment"),
    ],
)
def test_ims_url_with_userinfo_is_refused_without_echo(url: str, needle: str) -> None:
    """A password in ims_url would be logged with network errors; the refusal never quotes
    it, whether the URL is the file's or the daemon's default."""
    for obj, kw in [({**BASE, "ims_url": url}, {}), (BASE, {"default_ims_url": url})]:
        with pytest.raises(CredentialError) as err:
            parse(obj, **kw)
        assert err.value.field == "ims_url"
        assert needle in str(err.value)
        assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("name", [".", "..", "...", "." * 64])
def test_all_dots_names_are_refused(name: str) -> None:
    """A name is also its output directory: "." and ".." could never be written (and any run
    of dots reads like them), so the file fails at once instead of a credential that never
    publishes."""
    with pytest.raises(CredentialError) as err:
        parse({**BASE, "name": name})
    assert err.value.field == "name"
    assert "not only dots" in str(err.value)
    [c] = parse({**BASE, "name": ".a."})  # dots with something else are fine
    assert c.name == ".a."


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("c.json", b"[1, 2]", "must be an object"),
        ("c.json", b"{", "invalid JSON"),
        ("c.toml", b"a = ", "invalid TOML"),
        ("c.json", b"\xff\xfe", "not UTF-8"),
        ("c.yaml", b"{}", "unsupported file type"),
        ("c.json", b" " * (1 << 20) + b"{}", "larger than 1 MiB"),
        ("c.json", b"[" * 100_000, "invalid JSON"),
    ],
)
def test_unreadable_files(name: str, data: bytes, needle: str) -> None:
    with pytest.raises(CredentialError, match=needle):
        parse_credentials(Path("/creds") / name, data, env={})


def test_missing_env_and_secret_file() -> None:
    obj = {k: v for k, v in BASE.items() if k != "client_secret"}
    with pytest.raises(CredentialError, match="S_MISSING is not set"):
        parse({**obj, "client_secret_env": "S_MISSING"})
    with pytest.raises(CredentialError, match="file not found") as err:
        parse({**obj, "client_secret_file": "/creds/nonexistent.secret"})
    assert err.value.field == "client_secret_file"


def test_console_download_is_read_as_is() -> None:
    flat = {
        "CLIENT_ID": "cid",
        "CLIENT_SECRETS": [SECRET],
        "ORG_ID": ORG,
        "SCOPES": ["openid"],
        "TECHNICAL_ACCOUNT_ID": "t@techacct.adobe.com",
    }
    [c] = parse(flat, name="console.json", default_ims_url="https://ims-eu1.adobelogin.com")
    assert (c.name, c.client_id, c.ims_url) == ("console", "cid", "https://ims-eu1.adobelogin.com")
    with pytest.raises(CredentialError) as err:
        parse({**flat, "ORG_ID": ""}, name="console.json")
    assert err.value.field == "ORG_ID"


@given(
    secret=st.text(min_size=8, alphabet=st.characters(min_codepoint=33, max_codepoint=126)),
    field=st.sampled_from(["org_id", "scopes", "client_id", "bogus", "products"]),
    value=st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
)
def test_fuzz_secret_never_in_errors(secret: str, field: str, value: Any) -> None:
    secret = "p8e-" + secret
    error: CredentialError | None = None
    try:
        parse({**BASE, "client_secret": secret, field: value})
    except CredentialError as e:
        error = e
    if error is not None:
        assert secret not in str(error)
        assert error.path == "/creds/c.json"


# -- what a scan reads ---------------------------------------------------------------------


def test_read_user_file_takes_regular_files_only(tmp_path: Path) -> None:
    from imsd.credentials import read_user_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in (
        (fifo, "a FIFO"),
        (Path("/dev/zero"), "a character device"),
        (tmp_path, "a directory"),
    ):
        with pytest.raises(ValueError, match=f"not a regular file \\({kind}\\)"):
            read_user_file(path)
    big = tmp_path / "big"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(ValueError, match="larger than 1 MiB"):
        read_user_file(big)
    (tmp_path / "ok").write_bytes(b"x" * (1 << 20))
    (tmp_path / "link").symlink_to("ok")  # Kubernetes Secret volumes are symlinks
    assert read_user_file(tmp_path / "link") == b"x" * (1 << 20)


@pytest.mark.parametrize(
    ("auth", "field"),
    [("refresh_token", "refresh_token_file"), ("jwt", "private_key_file")],
)
def test_a_fifo_for_any_secret_field_is_a_file_error(tmp_path: Path, auth: str, field: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    obj = {**BASE, "auth": auth, field: str(fifo)}
    if auth == "jwt":
        obj.update(technical_account_id="t@techacct.adobe.com", metascopes=["ent_dataservices_sdk"])
    done: list[BaseException] = []

    def attempt() -> None:
        try:
            parse(obj, secret_roots=resolve_roots([tmp_path]))
        except CredentialError as e:
            done.append(e)

    # A daemon thread with a generous join: a hang guard, not a timing assertion.
    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():
        with contextlib.suppress(OSError):  # let the stuck reader see an end of file
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    [err] = done
    assert isinstance(err, CredentialError)
    assert err.field == field
    assert "not a regular file (a FIFO)" in str(err)


# -- where secret files may be --------------------------------------------------------------


def _secret_ref(field: str, ref: str) -> dict[str, Any]:
    obj = {k: v for k, v in BASE.items() if k != "client_secret"}
    if field == "client_secret_file":
        return {**obj, "client_secret_file": ref}
    return {**obj, "client_secret": SECRET, "auth": "refresh_token", field: ref}


@pytest.mark.parametrize("field", ["client_secret_file", "refresh_token_file"])
@pytest.mark.parametrize("ref", ["../outside.secret", "sub/../../outside.secret", ".."])
def test_a_relative_secret_path_may_not_leave_the_directory(
    tmp_path: Path, field: str, ref: str
) -> None:
    creds = tmp_path / "creds"
    (creds / "sub").mkdir(parents=True)
    (tmp_path / "outside.secret").write_text(SECRET)
    for creds_dir in (None, creds):  # next to the file, or in $CREDENTIALS_DIRECTORY
        with pytest.raises(CredentialError) as err:
            parse_credentials(
                creds / "c.json",
                json.dumps(_secret_ref(field, ref)).encode(),
                env={},
                credentials_directory=creds_dir,
            )
        assert err.value.field == field
        assert "may not leave the credentials directory" in str(err.value)


def test_relative_paths_inside_and_absolute_paths_in_a_root_are_read(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    (creds / "sub").mkdir(parents=True)
    (creds / "sub" / "a.secret").write_text("in-a-subdirectory")
    (tmp_path / "vault").mkdir()
    (tmp_path / "vault" / "b.secret").write_text("elsewhere-absolute")
    roots = resolve_roots([creds, tmp_path / "vault"])  # an extra root in the daemon's config
    for ref, value in (
        ("sub/a.secret", "in-a-subdirectory"),
        ("./sub/../sub/a.secret", "in-a-subdirectory"),
        (str(tmp_path / "vault" / "b.secret"), "elsewhere-absolute"),
        (str(creds / "sub" / "a.secret"), "in-a-subdirectory"),
    ):
        data = json.dumps(_secret_ref("client_secret_file", ref)).encode()
        [c] = parse_credentials(creds / "c.json", data, env={}, secret_roots=roots)
        assert c.client_secret.reveal() == value


@pytest.mark.parametrize(
    ("real", "roots", "inside"),
    [
        ("/run/secrets/aep", ["/run/secrets"], True),
        ("/run/secrets", ["/run/secrets"], True),
        ("/run/secrets/a/b/c", ["/run/secrets"], True),
        ("/run/secrets-evil/aep", ["/run/secrets"], False),  # a prefix, not a parent
        ("/run/secret", ["/run/secrets"], False),
        ("/run", ["/run/secrets"], False),
        ("/etc/shadow", ["/etc/imsd/credentials", "/run/secrets"], False),
        ("/etc/shadow", [], False),
        ("/etc/shadow", ["/"], True),  # the operator's choice
        ("/srv/vault/x", ["/etc/imsd/credentials", "/srv/vault"], True),
        ("/srv/vault/x", ["/srv/vault/"], True),
    ],
)
def test_inside_roots(real: str, roots: list[str], inside: bool) -> None:
    assert inside_roots(real, roots) is inside


def test_resolve_roots_resolves_symlinks_and_drops_repeats(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real = os.path.realpath(tmp_path / "real")
    assert resolve_roots([tmp_path / "link", tmp_path / "real"]) == (real,)


@pytest.mark.parametrize(
    "field", ["client_secret_file", "refresh_token_file", "private_key_file", "template"]
)
def test_a_secret_outside_every_root_is_refused(tmp_path: Path, field: str) -> None:
    """/etc/shadow (or any file the daemon can read) named by a credential file: refused
    before it is read, naming the file, the field and the setting; the same through a
    symlink in the credentials directory."""
    creds = tmp_path / "creds"
    creds.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "shadow").write_text("root:p8e-NotForIms:19000:0:99999:7:::")
    (creds / "link.secret").symlink_to(outside / "shadow")
    (creds / "dirlink").symlink_to(outside)
    reads: list[Path] = []

    def read(path: Path) -> str:
        reads.append(path)
        return "must-not-be-read"

    for ref in (str(outside / "shadow"), "link.secret", "dirlink/shadow", "/etc/shadow"):
        if field == "template":
            obj = {**BASE, "template": [{"source": ref, "destination": "out"}]}
            where = "template[0].source"
        elif field == "private_key_file":
            obj = {
                **BASE,
                "auth": "jwt",
                "technical_account_id": "t@techacct.adobe.com",
                "metascopes": ["ent_dataservices_sdk"],
                field: ref,
            }
            where = field
        else:
            obj, where = _secret_ref(field, ref), field
        for reader in (read, None):
            with pytest.raises(CredentialError) as err:
                parse_credentials(
                    creds / "c.json",
                    json.dumps(obj).encode(),
                    env={},
                    read_secret=reader,
                    secret_roots=resolve_roots([creds, tmp_path / "vault"]),
                )
            message = str(err.value)
            assert err.value.field == where
            assert str(creds / "c.json") in message
            assert "outside every secret root" in message
            assert "secret_roots in the daemon's config" in message
            assert "p8e-" not in message
            assert "root:" not in message
    assert reads == []


def test_a_symlink_swapped_in_after_the_check_is_caught_on_the_open(tmp_path: Path) -> None:
    """The roots are checked again on the file the kernel opened (/proc/self/fd): a path
    that resolved inside a root at the check but leads out at the open is refused."""
    from imsd.credentials import read_secret_file

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "shadow").write_text("outside")
    (root / "sub" / "shadow").write_text("inside")
    roots = resolve_roots([root])
    assert read_secret_file(root / "sub" / "shadow", roots=roots) == "inside"
    (root / "sub" / "shadow").unlink()
    (root / "sub").rmdir()
    (root / "sub").symlink_to(tmp_path / "elsewhere")  # the swap
    with pytest.raises(ValueError, match="outside every secret root"):
        read_secret_file(root / "sub" / "shadow", roots=roots)


@pytest.mark.parametrize("field", ["client_secret_file", "refresh_token_file"])
def test_secret_paths_into_proc_and_sys_are_refused(tmp_path: Path, field: str) -> None:
    # /proc/self/environ holds every client_secret_env value of the daemon.
    (tmp_path / "link.secret").symlink_to("/proc/self/environ")
    for ref in ("/proc/self/environ", "link.secret", "/sys/kernel/uevent_seqnum"):
        data = json.dumps(_secret_ref(field, ref)).encode()
        with pytest.raises(CredentialError) as err:
            parse_credentials(tmp_path / "c.json", data, env={})
        assert err.value.field == field
        assert "not a file of secrets" in str(err.value)


COMMUNITY = Path(__file__).parent / "fixtures" / "community"


@pytest.mark.parametrize(
    ("fixture", "what"),
    [
        ("aepp-oauth.json", "an aepp config file: run imsd import {path} --name aepp-oauth,"),
        ("aepp-jwt.json", "an aepp config file: run imsd import {path} --name aepp-jwt,"),
        (
            "cjapy-oauth.json",
            "an aepp, cjapy or aanalytics2 config file: run imsd import {path} --name "
            "cjapy-oauth with --product aep (aepp) or --product cja (cjapy) or --product "
            "analytics (aanalytics2),",
        ),
        ("cjapy-console-keys.json", "a cjapy config file: run imsd import {path} --name"),
        ("aanalytics2-oauth.json", "an aanalytics2 config file: run imsd import {path} --name"),
        ("aanalytics2-jwt.json", "an aepp, cjapy or aanalytics2 config file: run imsd import"),
    ],
)
def test_a_community_config_file_in_the_directory_is_one_hint(
    tmp_path: Path, fixture: str, what: str
) -> None:
    """aepp/cjapy/aanalytics2 files dropped into the watched directory: one line saying what
    the file is and the import command, not a native field error (client_secret: exactly
    one of ... is required); never a secret."""
    path = tmp_path / fixture
    data = (COMMUNITY / fixture).read_bytes()
    with pytest.raises(CredentialError) as err:
        parse_credentials(path, data, env={})
    message = str(err.value)
    assert message.startswith(f"{path}: looks like {what.format(path=path)}")
    assert message.endswith("then remove it (it holds the secret)")
    assert "\n" not in message
    assert "exactly one of" not in message
    assert "p8e-" not in message


def test_native_files_are_never_taken_for_community_ones(tmp_path: Path) -> None:
    """A native JSON file with the keys aepp also reads works; a native file with a typo, a
    TOML one with aepp's keys and one naming its auth get the native errors."""
    [c] = parse({k: v for k, v in BASE.items() if k != "auth"})
    assert c.client_secret.reveal() == SECRET
    for obj in ({**BASE, "secret": "x"}, {**BASE, "sandbox-name": "prod", "products": ["aep"]}):
        with pytest.raises(CredentialError) as err:
            parse(obj)
        assert "looks like" not in str(err.value)
    toml = b'client_id = "cid"\nsecret = "s"\norg_id = "o@AdobeOrg"\nscopes = "openid"\n'
    with pytest.raises(CredentialError) as err:
        parse_credentials(tmp_path / "c.toml", toml, env={})
    assert "looks like" not in str(err.value)


def test_imsd_check_says_the_hint_in_one_line(tmp_path: Path) -> None:
    from imsd.daemon import check
    from imsd.registry import load_registry

    from tests.support import make_settings

    s = make_settings(tmp_path)
    (s.credentials_dir / "aep.json").write_bytes((COMMUNITY / "aepp-oauth.json").read_bytes())
    [problem] = check(s, load_registry())
    path = s.credentials_dir / "aep.json"
    assert problem == (
        f"{path}: looks like an aepp config file: run imsd import {path} --name aep, then "
        "remove it (it holds the secret)"
    )
