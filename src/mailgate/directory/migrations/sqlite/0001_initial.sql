-- Schema version 1 of the mailgate directory (SQLite): accounts, managed domains, DKIM key
-- references, grants. Run by directory/migrate.py inside one transaction, which records the
-- version in schema_version. Its twin is ../postgresql/0001_initial.sql.
-- Logins and addresses compare case-insensitively (COLLATE NOCASE): what operators expect.

-- One row. Bumped by the triggers below on every change to users, grants, domains and keys,
-- so that another process's credential cache can notice (Directory.generation()).
CREATE TABLE IF NOT EXISTS generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO generation (id, value) VALUES (1, 0);

CREATE TABLE IF NOT EXISTS users (
    login TEXT PRIMARY KEY COLLATE NOCASE,
    address TEXT NOT NULL COLLATE NOCASE,      -- primary address; domain stored lower-case
    password_hash TEXT NOT NULL,               -- argon2id, PHC string format
    enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    suspended INTEGER NOT NULL DEFAULT 0 CHECK (suspended IN (0, 1))
);

CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    smarthost_networks TEXT NOT NULL DEFAULT '[]'  -- JSON list of networks, e.g. ["10.1.0.0/16"]
);

CREATE TABLE IF NOT EXISTS dkim_keys (
    domain TEXT NOT NULL COLLATE NOCASE REFERENCES domains (name) ON DELETE CASCADE,
    selector TEXT NOT NULL COLLATE NOCASE,
    algorithm TEXT NOT NULL CHECK (algorithm IN ('rsa-sha256', 'ed25519-sha256')),
    key_path TEXT NOT NULL,                    -- relative paths are relative to the data folder
    public_key_b64 TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    PRIMARY KEY (domain, selector)
);

-- address is "local@domain" or "*@domain" (every address of the domain).
CREATE TABLE IF NOT EXISTS grants (
    address TEXT NOT NULL COLLATE NOCASE,
    login TEXT NOT NULL COLLATE NOCASE REFERENCES users (login) ON DELETE CASCADE,
    PRIMARY KEY (address, login)
);
CREATE INDEX IF NOT EXISTS grants_by_login ON grants (login);

CREATE TRIGGER IF NOT EXISTS users_insert_generation AFTER INSERT ON users
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS users_update_generation AFTER UPDATE ON users
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS users_delete_generation AFTER DELETE ON users
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS grants_insert_generation AFTER INSERT ON grants
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS grants_delete_generation AFTER DELETE ON grants
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS domains_insert_generation AFTER INSERT ON domains
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS domains_update_generation AFTER UPDATE ON domains
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS domains_delete_generation AFTER DELETE ON domains
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS dkim_keys_insert_generation AFTER INSERT ON dkim_keys
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS dkim_keys_update_generation AFTER UPDATE ON dkim_keys
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS dkim_keys_delete_generation AFTER DELETE ON dkim_keys
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
