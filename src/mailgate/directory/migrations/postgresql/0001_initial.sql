-- Schema version 1 of the mailgate directory (PostgreSQL): the same tables as
-- ../sqlite/0001_initial.sql. Run by directory/migrate.py inside one transaction (under an
-- advisory lock, so that two nodes migrating at once apply it once).
-- Logins, addresses, domains and selectors are citext: they compare case-insensitively, as
-- SQLite's COLLATE NOCASE does (citext is a trusted extension: a database owner may create it).

CREATE EXTENSION IF NOT EXISTS citext;

-- One row, bumped by the triggers below on every change; each bump also sends a NOTIFY on
-- channel mailgate_directory (delivered at commit), so every node's cache reloads at once.
CREATE TABLE generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO generation (id, value) VALUES (1, 0);

CREATE TABLE users (
    login CITEXT PRIMARY KEY,
    address CITEXT NOT NULL,                   -- primary address; domain stored lower-case
    password_hash TEXT NOT NULL,               -- argon2id, PHC string format
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    suspended BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE domains (
    name CITEXT PRIMARY KEY,
    smarthost_networks TEXT NOT NULL DEFAULT '[]'  -- JSON list of networks, e.g. ["10.1.0.0/16"]
);

CREATE TABLE dkim_keys (
    domain CITEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    selector CITEXT NOT NULL,
    algorithm TEXT NOT NULL CHECK (algorithm IN ('rsa-sha256', 'ed25519-sha256')),
    key_path TEXT NOT NULL,                    -- relative paths are relative to the data folder
    public_key_b64 TEXT NOT NULL,
    active BOOLEAN NOT NULL DEFAULT TRUE,
    PRIMARY KEY (domain, selector)
);

-- address is "local@domain" or "*@domain" (every address of the domain).
CREATE TABLE grants (
    address CITEXT NOT NULL,
    login CITEXT NOT NULL REFERENCES users (login) ON DELETE CASCADE,
    PRIMARY KEY (address, login)
);
CREATE INDEX grants_by_login ON grants (login);

CREATE FUNCTION mailgate_bump_generation() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE generation SET value = value + 1 WHERE id = 1;
    PERFORM pg_notify('mailgate_directory', '');
    RETURN NULL;
END
$fn$;

CREATE TRIGGER users_generation AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION mailgate_bump_generation();
CREATE TRIGGER grants_generation AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH STATEMENT EXECUTE FUNCTION mailgate_bump_generation();
CREATE TRIGGER domains_generation AFTER INSERT OR UPDATE OR DELETE ON domains
    FOR EACH STATEMENT EXECUTE FUNCTION mailgate_bump_generation();
CREATE TRIGGER dkim_keys_generation AFTER INSERT OR UPDATE OR DELETE ON dkim_keys
    FOR EACH STATEMENT EXECUTE FUNCTION mailgate_bump_generation();
