-- Sign-in sessions and their refresh tokens (write side only).
--
-- A password grant starts a session; each refresh token belongs to one and
-- is used once: using it marks it used and issues the next. Presenting a
-- used token again means it was copied, so the whole session is revoked
-- (RFC 9700, refresh token rotation). Deactivation revokes every session of
-- the user, a password change every other one, in the transaction that
-- appends the event.
--
-- Only the SHA-256 of a token is stored; it is also the lookup key, so the
-- application never compares a secret itself.
CREATE TABLE refresh_sessions (
    session_id      uuid PRIMARY KEY,
    user_id         uuid        NOT NULL,
    client_id       text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    revoked_because text
);

CREATE INDEX refresh_sessions_live_by_user_idx
    ON refresh_sessions (user_id) WHERE revoked_at IS NULL;

CREATE TABLE refresh_tokens (
    digest     bytea PRIMARY KEY CHECK (octet_length(digest) = 32),
    session_id uuid        NOT NULL REFERENCES refresh_sessions ON DELETE CASCADE,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);

CREATE INDEX refresh_tokens_session_idx ON refresh_tokens (session_id);
CREATE INDEX refresh_tokens_expiry_idx ON refresh_tokens (expires_at);

-- The command API alone issues, rotates, revokes and sweeps them; the read
-- side never sees these tables (invariant 10).
GRANT SELECT, INSERT, UPDATE, DELETE ON refresh_sessions, refresh_tokens TO userstream_command;
