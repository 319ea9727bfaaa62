-- The read side's view of the log: every column a projection needs, and no
-- write-side secret (the password hash is removed from the payload). The
-- projector, `projector rebuild` and `projector verify` read the log only
-- through this view.
CREATE VIEW events_public AS
SELECT global_position,
       transaction_id,
       stream_id,
       stream_version,
       event_id,
       event_type,
       schema_version,
       payload - 'password_hash' AS payload,
       recorded_at
FROM events;

-- One row: which projection generation serves, and which Redis namespace
-- may be trusted.
--
-- * projection_version: the generation of user_views; `projector rebuild`
--   raises it when it switches, which also moves the Redis namespace.
-- * cache_epoch: random, names the Redis namespace in use; NULL while no
--   namespace can be trusted (Redis could not be told about a commit), until
--   the projector opens a fresh one.
-- * batch_seq: the sequence number of the last committed projection batch.
--   Before committing, a batch records its number in Redis; a namespace whose
--   recorded number is below this one has lost writes and is not trusted.
--
-- Every projection batch locks this row first, so batches, rebuild switches
-- and namespace changes are serialised.
CREATE TABLE projection_state (
    singleton          boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    projection_version integer     NOT NULL DEFAULT 1,
    cache_epoch        bigint,
    batch_seq          bigint      NOT NULL DEFAULT 0,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO projection_state DEFAULT VALUES;

-- Batch numbers are never reused, not even after a rolled-back batch, so a
-- Redis snapshot taken before a batch can never look as new as it.
CREATE SEQUENCE projection_batch_seq;

-- Tells readers (the query API) the new state at commit, as
-- "projection_version:cache_epoch:batch_seq" (cache_epoch empty when NULL),
-- so they need not query it.
CREATE FUNCTION projection_state_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('projection_state',
        NEW.projection_version || ':' || coalesce(NEW.cache_epoch::text, '') || ':' || NEW.batch_seq);
    RETURN NULL;
END;
$$;

CREATE TRIGGER projection_state_changed
    AFTER UPDATE ON projection_state
    FOR EACH ROW EXECUTE FUNCTION projection_state_notify();

-- Progress per Kafka partition, written in the transaction that applies the
-- partition's messages: what `projector status` and /metrics report.
CREATE TABLE projector_partitions (
    topic         text        NOT NULL,
    partition     integer     NOT NULL,
    next_offset   bigint      NOT NULL,
    last_position bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Messages the projector could not apply, with why; each affects one user at
-- most. `projector retry` runs them through the projection again.
CREATE TABLE projector_parked (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    kafka_offset   bigint      NOT NULL,
    message_key    text,
    ce_id          text,
    ce_type        text,
    body           bytea       NOT NULL,
    user_id        uuid,
    stream_version integer,
    reason         text        NOT NULL CHECK (reason IN
        ('undecodable', 'unknown_type', 'not_in_log', 'invalid_transition', 'gap')),
    detail         text        NOT NULL,
    attempts       integer     NOT NULL DEFAULT 1,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    last_attempt   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projector_parked_message_key UNIQUE (topic, partition, kafka_offset)
);
