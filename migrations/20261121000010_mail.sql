-- Mail: codes that go by mail stay sealed in the log, and the notifier keeps
-- what it has sent.
--
-- Email verification and password reset codes are stored in the payload of
-- their events under `sealed_code` (AES-256-GCM under MAIL_CODE_KEY, which
-- only the command API and the notifier hold; see events/src/codes.rs).
-- The read side's way into the log drops them as it drops password hashes.
CREATE OR REPLACE VIEW events_public AS
SELECT global_position,
       transaction_id,
       stream_id,
       stream_version,
       event_id,
       event_type,
       schema_version,
       payload - 'password_hash' - 'sealed_code' AS payload,
       recorded_at
FROM events;

-- The notifier's only way into the log: the sealed code of one event, found
-- by the event's id (ce_id on the topic). A view runs with its owner's
-- rights, so the notifier reads these columns and nothing else of `events`
-- (no hash, no other payload). `code_expires_at` is the code's expiry: under
-- `code_expires_at` in a registration (it is not on the topic there), under
-- `expires_at` in the request events.
CREATE VIEW mail_codes AS
SELECT event_id,
       stream_id,
       payload ->> 'sealed_code' AS sealed_code,
       COALESCE(payload ->> 'code_expires_at', payload ->> 'expires_at')::timestamptz AS code_expires_at
FROM events
WHERE payload ? 'sealed_code';

-- One row per event that asks for a mail, keyed by the event id (the topic's
-- ce_id): the notifier's deduplication and its work queue. A row is written
-- when the message is consumed and updated with every send's outcome.
--
-- * status: pending (to send, at next_attempt_at), sent, expired (its code
--   ran out before it could go), parked (attempts exhausted or a permanent
--   refusal; `notifier retry` makes it pending again).
-- * The code itself is never stored here: the sender reads it from
--   mail_codes at send time.
CREATE TABLE notifier_mails (
    event_id        uuid        PRIMARY KEY,
    user_id         uuid        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('welcome', 'email_verification', 'password_reset')),
    recipient       text        NOT NULL,
    code_expires_at timestamptz NULL,
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'sent', 'expired', 'parked')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text        NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notifier_mails_due ON notifier_mails (next_attempt_at) WHERE status = 'pending';

-- Like the other service roles: no object in `public` is reachable without
-- USAGE on the schema (migration 5 revoked it from PUBLIC).
GRANT USAGE ON SCHEMA public TO userstream_notifier;
GRANT SELECT ON mail_codes TO userstream_notifier;
GRANT SELECT, INSERT, UPDATE ON notifier_mails TO userstream_notifier;
