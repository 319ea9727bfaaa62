-- Identity on the read side: a user's roles and the end of a lockout, folded
-- from user.role_granted/role_revoked.v1 and user.locked/unlocked.v1.
--
-- * roles: the roles granted and not revoked, sorted and unique (the fold
--   keeps them so); empty for every user who never had one, which is every
--   user projected before these events existed, so the default is their
--   true value and no rebuild is needed.
-- * locked_until: set while a lockout from failed password checks may be in
--   force; NULL when none was imposed or it was lifted. Whether it is in
--   force is a comparison with the reader's clock, not stored.
--
-- `projector rebuild` creates each generation LIKE user_views, so it gets
-- these columns and defaults; ADD COLUMN keeps the table's owner
-- (userstream_projector) and the query role's SELECT, which covers new
-- columns.
ALTER TABLE user_views
    ADD COLUMN roles        text[]      NOT NULL DEFAULT '{}',
    ADD COLUMN locked_until timestamptz NULL;

-- Redis entries cached before this migration hold bodies without the two
-- fields, and readers serve a settled body as it is. Dropping the trusted
-- namespace (what a batch does when Redis cannot be told) makes readers use
-- PostgreSQL until the projector's keeper opens a fresh, empty one.
UPDATE projection_state SET cache_epoch = NULL, updated_at = now() WHERE singleton;
