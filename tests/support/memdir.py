"""An in-memory Directory for unit tests of policy and sessions (no SQLite, no argon2)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from mailgate.directory import AppPassword, User
from mailgate.values import DkimKey, Domain


class MemoryDirectory:
    def __init__(self, default_domain: str = "example.org") -> None:
        self.default_domain = default_domain
        self.users: dict[str, User] = {}
        self.passwords: dict[str, str] = {}
        self.domains: dict[str, Domain] = {}
        self.grants: set[tuple[str, str]] = set()
        self.gen = 0
        self.app_passwords: dict[tuple[str, str], tuple[str, AppPassword]] = {}

    def add_user(self, login: str, address: str, password: str) -> User:
        user = User(login, address or f"{login}@{self.default_domain}")
        self.users[login] = user
        self.passwords[login] = password
        self.gen += 1
        return user

    def ensure_account(self, login: str, address: str) -> bool:
        if login in self.users:
            return False
        self.add_user(login, address, "!external")
        return True

    def set_password(self, login: str, password: str) -> None:
        self.passwords[login] = password
        self.gen += 1

    def set_enabled(self, login: str, enabled: bool) -> None:
        self.users[login] = replace(self.users[login], enabled=enabled, suspended=False)
        self.gen += 1

    def set_suspended(self, login: str, suspended: bool) -> None:
        self.users[login] = replace(self.users[login], suspended=suspended)
        self.gen += 1

    def remove_user(self, login: str) -> None:
        self.users.pop(login, None)
        self.gen += 1

    def get_user(self, login: str) -> User | None:
        return self.users.get(login)

    def list_users(self) -> list[User]:
        return sorted(self.users.values(), key=lambda u: u.login)

    def verify_password(self, login: str, password: str) -> User | None:
        user = self.users.get(login)
        if user is None or not user.enabled or user.suspended:
            return None
        return user if self.passwords.get(login) == password else None

    def add_app_password(self, login: str, name: str, secret_hash: str) -> AppPassword:
        app = AppPassword(login, name, dt.datetime.now(dt.UTC))
        self.app_passwords[(login, name)] = (secret_hash, app)
        self.gen += 1
        return app

    def list_app_passwords(self, login: str | None = None) -> list[AppPassword]:
        return [
            a for (who, _), (_, a) in sorted(self.app_passwords.items()) if login in (None, who)
        ]

    def remove_app_password(self, login: str, name: str) -> None:
        del self.app_passwords[(login, name)]
        self.gen += 1

    def use_app_password(self, login: str, secret_hash: str) -> str | None:
        for (who, name), (stored, app) in self.app_passwords.items():
            if who == login and stored == secret_hash:
                used = replace(app, last_used_at=dt.datetime.now(dt.UTC))
                self.app_passwords[(who, name)] = (stored, used)
                return name
        return None

    def add_domain(self, name: str) -> Domain:
        self.domains[name] = Domain(name)
        return self.domains[name]

    def remove_domain(self, name: str) -> None:
        self.domains.pop(name, None)

    def get_domain(self, name: str) -> Domain | None:
        return self.domains.get(name.lower())

    def list_domains(self) -> list[Domain]:
        return list(self.domains.values())

    def set_smarthost_networks(self, domain: str, networks: tuple[str, ...]) -> None:
        self.domains[domain] = replace(self.domains[domain], smarthost_networks=tuple(networks))

    def add_dkim_key(self, domain: str, key: DkimKey) -> None:
        d = self.domains[domain]
        self.domains[domain] = replace(d, keys=(*d.keys, key))

    def set_dkim_key_active(self, domain: str, selector: str, active: bool) -> None:
        d = self.domains[domain]
        keys = tuple(replace(k, active=active) if k.selector == selector else k for k in d.keys)
        self.domains[domain] = replace(d, keys=keys)

    def remove_dkim_key(self, domain: str, selector: str) -> None:
        d = self.domains[domain]
        self.domains[domain] = replace(d, keys=tuple(k for k in d.keys if k.selector != selector))

    def grant(self, address: str, login: str) -> None:
        self.grants.add((address.lower(), login))

    def revoke(self, address: str, login: str | None = None) -> None:
        self.grants = {
            g for g in self.grants if not (g[0] == address.lower() and login in (None, g[1]))
        }

    def list_grants(self, owner: str | None = None) -> list[tuple[str, str]]:
        return sorted(g for g in self.grants if owner in (None, g[1]))

    def is_managed(self, domain: str) -> bool:
        return domain.lower() == self.default_domain or domain.lower() in self.domains

    def may_send_as(self, login: str, address: str) -> bool:
        user = self.users.get(login)
        if user is None:
            return False
        address = address.lower()
        domain = address.rpartition("@")[2]
        return (
            address == user.address.lower()
            or (address, login) in self.grants
            or (f"*@{domain}", login) in self.grants
        )

    def generation(self) -> int:
        return self.gen

    def sync(self) -> None:
        pass
