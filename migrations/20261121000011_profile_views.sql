-- Profiles and email verification on the read side, folded from
-- user.profile_changed.v1 and user.email_verified.v1 (see events::view).
--
-- * email_verified: whether `email` was confirmed with a mailed code. False
--   for every user projected before these events existed (none could have
--   verified), so the default is their true value and no rebuild is needed.
--   The verified address itself replaces `email` (an email change is a
--   verification of the new address), so lookups by email find it there.
-- * display_name, locale, time_zone: the profile as the last
--   user.profile_changed.v1 left it (each event carries the whole profile);
--   NULL when not set, which is every field of every user before profiles
--   existed.
-- * preferences: the profile's client-defined settings, a JSON object of
--   scalars, stored as the event carried it; `{}` when none were set. The
--   CHECK keeps it an object, what every reader decodes it as.
--
-- No mailed code is stored here: events_public (migration 10) drops
-- `sealed_code` before the read side sees a payload, and the view has no
-- field for it.
--
-- `projector rebuild` creates each generation LIKE user_views (INCLUDING
-- DEFAULTS INCLUDING CONSTRAINTS), so it gets these columns, defaults and the
-- CHECK; ADD COLUMN keeps the table's owner (userstream_projector) and the
-- query role's SELECT, which covers new columns.
ALTER TABLE user_views
    ADD COLUMN email_verified boolean NOT NULL DEFAULT false,
    ADD COLUMN display_name   text    NULL,
    ADD COLUMN locale         text    NULL,
    ADD COLUMN time_zone      text    NULL,
    ADD COLUMN preferences    jsonb   NOT NULL DEFAULT '{}'
        CONSTRAINT user_views_preferences_object CHECK (jsonb_typeof(preferences) = 'object');

-- Redis entries cached before this migration hold bodies without
-- `email_verified` and `profile`, and readers serve a settled body as it is.
-- Dropping the trusted namespace (what a batch does when Redis cannot be
-- told) makes readers use PostgreSQL until the projector's keeper opens a
-- fresh, empty one.
UPDATE projection_state SET cache_epoch = NULL, updated_at = now() WHERE singleton;
