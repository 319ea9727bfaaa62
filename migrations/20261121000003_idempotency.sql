-- Answers to commands sent with an Idempotency-Key, written in the same
-- transaction as the events they answer, so a retry gets the first answer
-- and appends nothing. Rows past expires_at are ignored and swept.
CREATE TABLE idempotency_keys (
    key         text PRIMARY KEY,
    -- SHA-256 over the method, the path and the command's content (never a password).
    fingerprint text        NOT NULL,
    status      smallint    NOT NULL,
    stream_id   uuid        NOT NULL,
    version     integer     NOT NULL,
    position    bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
