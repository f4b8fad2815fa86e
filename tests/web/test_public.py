"""`[web] listen` over HTTP: every set-up URL answers for a managed domain, refuses the rest."""

from __future__ import annotations

import plistlib
import subprocess
from pathlib import Path

from mailgate import config
from mailgate.config import Config
from mailgate.web import setup_formats
from mailgate.web.common import CSP
from mailgate.web.public import WebContext, make_web_app
from tests.support.testca import TestCA
from tests.unit.test_web_formats import BASE, STANDARD_REQUEST, parse_xml
from tests.web.conftest import run, served

ERROR_CODE = "d:Response/d:Error/d:ErrorCode"
MANAGED = {"example.org", "stbotolphs.example.org"}


def cfg(tmp_path: Path) -> Config:
    text = BASE + '[smarthost]\nlisten = ["127.0.0.1:25"]\n'
    return config.parse(text, tmp_path / "mailgate.toml")


def test_thunderbird_both_urls(tmp_path: Path) -> None:
    async def go() -> None:
        async with served(make_web_app(WebContext(cfg(tmp_path), MANAGED.__contains__))) as c:
            for path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"):
                r = await c.get(path, params={"emailaddress": "bursar@stbotolphs.example.org"})
                assert r.status == 200
                assert r.content_type == "application/xml"
                root = parse_xml(await r.read())
                servers = root.findall("emailProvider/outgoingServer")
                assert [(s.findtext("port"), s.findtext("socketType"), s.findtext("username"))
                        for s in servers] == [("465", "SSL", "bursar"),
                                              ("587", "STARTTLS", "bursar")]  # fmt: skip
            r = await c.get("/mail/config-v1.1.xml", params={"emailaddress": "x@other.example"})
            assert r.status == 404
            assert list(parse_xml(await r.read())) == []
            r = await c.get("/mail/config-v1.1.xml", params={"emailaddress": "no-at-sign"})
            assert r.status == 400

    run(go)


def test_autodiscover_standard_request(tmp_path: Path) -> None:
    async def go() -> None:
        async with served(make_web_app(WebContext(cfg(tmp_path), MANAGED.__contains__))) as c:
            for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"):
                r = await c.post(path, data=STANDARD_REQUEST,
                                 headers={"Content-Type": "text/xml"})  # fmt: skip
                assert r.status == 200
                root = parse_xml(await r.read())
                ns = {"a": setup_formats.OUTLOOK_RESPONSE_NS}
                ports = [p.findtext("a:Port", namespaces=ns)
                         for p in root.iterfind("a:Response/a:Account/a:Protocol", ns)]  # fmt: skip
                assert ports == ["465", "587"]
            unknown = STANDARD_REQUEST.replace(b"alice@example.org", b"eve@elsewhere.example")
            r = await c.post("/autodiscover/autodiscover.xml", data=unknown)
            ns = {"d": setup_formats.AUTODISCOVER_NS}
            code = parse_xml(await r.read()).findtext(ERROR_CODE, namespaces=ns)
            assert code == "500"
            r = await c.post("/autodiscover/autodiscover.xml", data=b"<x>&lol;</x>")
            code = parse_xml(await r.read()).findtext(ERROR_CODE, namespaces=ns)
            assert code == "600"

    run(go)


def test_mobileconfig_download(tmp_path: Path) -> None:
    async def go() -> None:
        async with served(make_web_app(WebContext(cfg(tmp_path), MANAGED.__contains__))) as c:
            r = await c.get("/apple/mobileconfig", params={"emailaddress": "alice@example.org"})
            assert r.status == 200
            assert r.content_type == "application/x-apple-aspen-config"
            assert "attachment" in r.headers["Content-Disposition"]
            # no certificate files in tmp_path: served unsigned
            profile = plistlib.loads(await r.read())
            assert profile["PayloadContent"][0]["OutgoingMailServerPortNumber"] == 465
            r = await c.get("/apple/mobileconfig", params={"emailaddress": "x@other.example"})
            assert r.status == 404 and r.content_type == "text/html"

    run(go)


def test_settings_page_and_its_refusals(tmp_path: Path) -> None:
    async def go() -> None:
        async with served(make_web_app(WebContext(cfg(tmp_path), MANAGED.__contains__))) as c:
            r = await c.get("/settings", params={"emailaddress": "alice@example.org"})
            assert r.status == 200
            assert r.headers["Content-Security-Policy"] == CSP
            text = await r.text()
            assert 'data-setting="port">465<' in text and 'data-setting="port">587<' in text
            assert "SSL/TLS" in text and "STARTTLS" in text and "port 25 block" in text
            assert 'data-setting="username">alice<' in text
            r = await c.get("/settings", params={"emailaddress": "<b>x</b>@other.example"})
            assert r.status == 400 and "<b>x</b>" not in await r.text()
            r = await c.get("/settings", params={"emailaddress": "x@other.example"})
            assert r.status == 404
            assert "other.example</strong> is not one of the mail domains" in await r.text()
            r = await c.get("/settings")
            assert r.status == 200 and 'name="emailaddress"' in await r.text()
            r = await c.get("/", allow_redirects=False)
            assert r.status == 302 and r.headers["Location"] == "/settings"

    run(go)


def test_a_directory_that_fails_is_503(tmp_path: Path) -> None:
    def broken(domain: str) -> bool:
        raise OSError("connection refused")

    async def go() -> None:
        async with served(make_web_app(WebContext(cfg(tmp_path), broken))) as c:
            r = await c.get("/settings", params={"emailaddress": "alice@example.org"})
            assert r.status == 503
            r = await c.get("/mail/config-v1.1.xml", params={"emailaddress": "alice@example.org"})
            assert r.status == 503

    run(go)


def test_thunderbird_without_an_address_uses_the_host_and_placeholders(tmp_path: Path) -> None:
    async def go() -> None:
        async with served(make_web_app(WebContext(cfg(tmp_path), MANAGED.__contains__))) as c:
            for host in ("autoconfig.stbotolphs.example.org", "stbotolphs.example.org:443"):
                r = await c.get("/.well-known/autoconfig/mail/config-v1.1.xml",
                                headers={"Host": host})  # fmt: skip
                assert r.status == 200, host
                root = parse_xml(await r.read())
                assert root.findtext("emailProvider/domain") == "stbotolphs.example.org"
                usernames = {s.findtext("username") for s in root.iter("outgoingServer")}
                assert usernames == {"%EMAILLOCALPART%"}
            r = await c.get("/mail/config-v1.1.xml", headers={"Host": "autoconfig.other.example"})
            assert r.status == 404

    run(go)


def test_profile_link_is_url_encoded(tmp_path: Path) -> None:
    async def go() -> None:
        async with served(make_web_app(WebContext(cfg(tmp_path), MANAGED.__contains__))) as c:
            r = await c.get("/settings", params={"emailaddress": "a+b@example.org"})
            text = await r.text()
            assert 'href="/apple/mobileconfig?emailaddress=a%2Bb%40example.org"' in text
            r = await c.get("/apple/mobileconfig", params={"emailaddress": "a+b@example.org"})
            assert r.status == 200
            assert plistlib.loads(await r.read())["PayloadContent"][0]["EmailAddress"] == (
                "a+b@example.org"
            )

    run(go)


def test_mobileconfig_is_served_signed_with_a_ca_certificate(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    issued = ca.issue("mail.example.org")
    text = f'hostname = "mail.example.org"\n[tls]\ncert = "{issued.cert}"\nkey = "{issued.key}"\n'
    text += '[submissions]\nlisten = ["127.0.0.1:465"]\n'
    signed_cfg = config.parse(text, tmp_path / "mailgate.toml")

    async def go() -> bytes:
        async with served(make_web_app(WebContext(signed_cfg, MANAGED.__contains__))) as c:
            r = await c.get("/apple/mobileconfig", params={"emailaddress": "alice@example.org"})
            assert r.status == 200
            return await r.read()

    body = run(go)
    (tmp_path / "profile.der").write_bytes(body)
    out = subprocess.run(
        ["openssl", "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "profile.der"),
         "-CAfile", str(ca.cert_path), "-purpose", "any"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert plistlib.loads(out.stdout)["PayloadContent"][0]["OutgoingMailServerPortNumber"] == 465
