-- Read-your-writes (`?min_position=P` on the query API).
--
-- The projector keeps a frontier: the point in the log's publication order
-- (transaction id, then position; the relay's order) up to which every
-- event is applied to the read model, or parked. A command's answer carries
-- its event's position; every write that finished before it began has a
-- smaller transaction id and so lies before it in that order.
ALTER TABLE projection_state
    ADD COLUMN applied_xid      bigint NOT NULL DEFAULT 0,
    ADD COLUMN applied_position bigint NOT NULL DEFAULT 0;

-- The notification now carries the frontier too:
-- "projection_version:cache_epoch:batch_seq:applied_xid:applied_position".
CREATE OR REPLACE FUNCTION projection_state_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('projection_state',
        NEW.projection_version || ':' || coalesce(NEW.cache_epoch::text, '') || ':' || NEW.batch_seq
        || ':' || NEW.applied_xid || ':' || NEW.applied_position);
    RETURN NULL;
END;
$$;

-- Where each position lies in publication order, for the query API to
-- compare a position with the frontier: no stream, payload or secret.
CREATE VIEW event_order AS
    SELECT global_position, transaction_id::text::bigint AS transaction_id FROM events;
GRANT SELECT ON event_order TO userstream_query;
