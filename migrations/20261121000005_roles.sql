-- Least privilege (DESIGN.md invariant 10): one PostgreSQL role per service.
--
-- The roles are cluster-wide and hold passwords, so the deployment creates
-- them (scripts/stack locally, docker/postgres-init.sql under compose, the
-- operator in production) before the migrations run:
--
--   userstream_owner      LOGIN, runs these migrations and owns the log;
--                         member of userstream_projector (to hand it the
--                         read-model tables). Used for nothing else.
--   userstream_command    LOGIN: the command API.
--   userstream_projector  LOGIN: the projector and its subcommands.
--   userstream_query      LOGIN: the query API.
--
-- None is a superuser; no service role owns `events`, so none can disable its
-- triggers, and only superusers may set session_replication_role.

REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO userstream_command, userstream_projector, userstream_query;

-- Start-up checks read which migrations are applied.
GRANT SELECT ON _sqlx_migrations TO userstream_command, userstream_projector, userstream_query;

-- The command API appends and reads the log (it replays streams and checks
-- passwords against the logged hash) and keeps its own tables.
GRANT SELECT, INSERT ON events TO userstream_command;
GRANT SELECT, INSERT ON user_identities TO userstream_command;
GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO userstream_command;
GRANT SELECT, INSERT, UPDATE ON relay_checkpoints TO userstream_command;

-- The projector reads the log only through events_public (no password
-- hash) and owns the read model, which it can rebuild: `projector rebuild`
-- creates the next generation of user_views, renames and drops tables.
GRANT SELECT ON events_public TO userstream_projector;
-- (A new owner needs CREATE on the schema first.)
GRANT CREATE ON SCHEMA public TO userstream_projector;
ALTER TABLE user_views OWNER TO userstream_projector;
ALTER TABLE projection_state OWNER TO userstream_projector;
ALTER TABLE projector_partitions OWNER TO userstream_projector;
ALTER TABLE projector_parked OWNER TO userstream_projector;
ALTER SEQUENCE projection_batch_seq OWNER TO userstream_projector;

-- The query API only reads read models, including generations the projector
-- creates later.
GRANT SELECT ON user_views, projection_state TO userstream_query;
ALTER DEFAULT PRIVILEGES FOR ROLE userstream_projector IN SCHEMA public
    GRANT SELECT ON TABLES TO userstream_query;
