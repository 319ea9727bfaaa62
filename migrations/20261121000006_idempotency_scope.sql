-- Idempotency keys are scoped by caller and route: one caller's key can never
-- replay or block another caller's command, nor a command on another route.
-- `scope` is built by the command API (http/idempotency.rs): the caller's
-- principal, the method and the route template, and for anonymous callers
-- also the command's fingerprint (anonymous callers have no identity to
-- tell them apart, so a key of theirs only ever matches the same command).
--
-- Keys recorded before this migration had no scope; they get the empty one,
-- which no request uses, so they answer no more retries and expire as usual.
ALTER TABLE idempotency_keys ADD COLUMN scope text NOT NULL DEFAULT '';
ALTER TABLE idempotency_keys ALTER COLUMN scope DROP DEFAULT;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (scope, key);
