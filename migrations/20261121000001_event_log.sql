-- The append-only event log: the single source of truth.
CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction; readers stay below pg_snapshot_xmin so an event
    -- that commits late with a lower position is never skipped.
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id       uuid        NOT NULL,
    stream_version  integer     NOT NULL CHECK (stream_version >= 1),
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  smallint    NOT NULL CHECK (schema_version >= 1),
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

-- The relay's read order.
CREATE INDEX events_transaction_order_idx ON events (transaction_id, global_position);

-- The database itself refuses to change history, whatever the client.
CREATE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Wakes log readers (the relay) when an appending transaction commits;
-- NOTIFY is delivered at commit, never for a rolled-back append.
CREATE FUNCTION events_notify_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('events_appended', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_appended
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify_appended();

-- Username and email reservations, written in the same transaction as the
-- UserRegistered event, so two racing registrations cannot both win.
CREATE TABLE user_identities (
    user_id  uuid PRIMARY KEY,
    username text NOT NULL,
    email    text NOT NULL,
    CONSTRAINT user_identities_username_key UNIQUE (username),
    CONSTRAINT user_identities_email_key UNIQUE (email)
);

-- How far each log reader has delivered: (transaction id, position) of the
-- last event Kafka acknowledged.
CREATE TABLE relay_checkpoints (
    relay           text PRIMARY KEY,
    transaction_id  xid8        NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
