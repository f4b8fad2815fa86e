-- App passwords (`mailgate app-password`): for programs that cannot do the institution's single
-- sign-on. secret_hash is passwords.app_password_hash() of a random 99-bit secret, never the
-- secret. Times are ISO-8601 UTC text (the same in both dialects). Adding or removing one bumps
-- the generation and NOTIFYs (credential caches forget it at once); recording a use
-- (last_used_at, an UPDATE) does not.
CREATE TABLE app_passwords (
    login CITEXT NOT NULL REFERENCES users (login) ON DELETE CASCADE,
    name CITEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    last_used_at TEXT,
    PRIMARY KEY (login, name)
);

CREATE TRIGGER app_passwords_generation AFTER INSERT OR DELETE ON app_passwords
    FOR EACH STATEMENT EXECUTE FUNCTION mailgate_bump_generation();
