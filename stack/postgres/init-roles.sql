-- Docker's postgres image runs this once, when it creates the database:
-- one role per service, as scripts/stack creates them locally. The
-- passwords are LOCAL DEVELOPMENT DEFAULTS (each role's own name), never
-- for production, where the operator creates the roles and their secrets.
CREATE ROLE userstream_owner LOGIN PASSWORD 'userstream_owner';
CREATE ROLE userstream_command LOGIN PASSWORD 'userstream_command';
CREATE ROLE userstream_projector LOGIN PASSWORD 'userstream_projector';
CREATE ROLE userstream_query LOGIN PASSWORD 'userstream_query';
CREATE ROLE userstream_notifier LOGIN PASSWORD 'userstream_notifier';
-- The migrating owner hands the read-model tables to the projector.
GRANT userstream_projector TO userstream_owner;
ALTER DATABASE userstream OWNER TO userstream_owner;
