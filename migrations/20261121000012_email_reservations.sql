-- Email addresses reserved by users: each user's current address, plus the
-- address an outstanding email change asked for. One unique key over both
-- kinds, so a registration and a change to one address race on the same
-- row and only one wins, as two registrations always did.
--
-- * expires_at: NULL for a current address; for a change, when its code
--   runs out. An address held by an expired change may be taken by anyone
--   (the holder can no longer confirm it).
-- * user_identities keeps the current address (sign-in by email, password
--   reset), updated when a change is confirmed.
CREATE TABLE email_reservations (
    email      text        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    expires_at timestamptz NULL
);
CREATE INDEX email_reservations_user ON email_reservations (user_id);

INSERT INTO email_reservations (email, user_id)
SELECT email, user_id FROM user_identities;

GRANT SELECT, INSERT, UPDATE, DELETE ON email_reservations TO userstream_command;
GRANT UPDATE (email) ON user_identities TO userstream_command;
