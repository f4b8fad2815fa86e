-- App passwords (`mailgate app-password`): for programs that cannot do the institution's single
-- sign-on. secret_hash is passwords.app_password_hash() of a random 99-bit secret, never the
-- secret. Times are ISO-8601 UTC text (the same in both dialects). Adding or removing one bumps
-- the generation (credential caches forget it at once); recording a use (last_used_at) does not.
CREATE TABLE IF NOT EXISTS app_passwords (
    login TEXT NOT NULL COLLATE NOCASE REFERENCES users (login) ON DELETE CASCADE,
    name TEXT NOT NULL COLLATE NOCASE,
    secret_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    last_used_at TEXT,
    PRIMARY KEY (login, name)
);

CREATE TRIGGER IF NOT EXISTS app_passwords_insert_generation AFTER INSERT ON app_passwords
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS app_passwords_delete_generation AFTER DELETE ON app_passwords
    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END;
