-- The user read model, built by the projector from users.events.v1.
CREATE TABLE user_views (
    id            uuid PRIMARY KEY,
    username      text        NOT NULL,
    email         text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('active', 'deactivated')),
    version       integer     NOT NULL CHECK (version >= 1),
    registered_at timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

CREATE INDEX user_views_username_idx ON user_views (username);
CREATE INDEX user_views_email_idx ON user_views (email);
CREATE INDEX user_views_status_id_idx ON user_views (status, id);
