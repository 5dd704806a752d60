-- The trust ledger: the projection of portal accounts that eligibility needs,
-- invitations, the links they create, and the append-only audit trail.

CREATE TABLE accounts (
    account_id   uuid        PRIMARY KEY,
    first_name   text        NOT NULL,
    last_name    text        NOT NULL,
    birth_date   date        NOT NULL,
    citizenship  text        NOT NULL,
    verified     boolean     NOT NULL,
    has_passport boolean     NOT NULL,
    -- Normalised to +7XXXXXXXXXX; NULL when the profile holds no phone.
    phone        text,
    -- occurred_at of the update this row reflects: an older update never
    -- overwrites a newer one.
    updated_at   timestamptz NOT NULL
);

CREATE INDEX accounts_by_phone ON accounts (phone) WHERE phone IS NOT NULL;

CREATE TABLE invitations (
    invitation_id  uuid        PRIMARY KEY,
    truster_id     uuid        NOT NULL,
    contact_id     uuid        NOT NULL,
    status         text        NOT NULL
        CHECK (status IN ('pending', 'accepted', 'declined', 'expired', 'replaced', 'refused')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    decided_at     timestamptz,
    -- The flow that opened the invitation, so its expiry can name it.
    correlation_id text        NOT NULL
);

CREATE UNIQUE INDEX one_pending_invitation_per_truster
    ON invitations (truster_id) WHERE status = 'pending';
CREATE INDEX pending_invitations_by_deadline
    ON invitations (expires_at) WHERE status = 'pending';
CREATE INDEX invitations_by_truster_and_time ON invitations (truster_id, created_at);

CREATE TABLE trust_links (
    link_id           uuid        PRIMARY KEY,
    truster_id        uuid        NOT NULL,
    contact_id        uuid        NOT NULL,
    invitation_id     uuid        NOT NULL REFERENCES invitations,
    status            text        NOT NULL CHECK (status IN ('active', 'disconnected')),
    connected_at      timestamptz NOT NULL DEFAULT now(),
    disconnected_at   timestamptz,
    disconnected_by   uuid
);

CREATE UNIQUE INDEX one_active_contact_per_truster
    ON trust_links (truster_id) WHERE status = 'active';
CREATE INDEX active_links_by_contact ON trust_links (contact_id) WHERE status = 'active';

-- Every state change, with who caused it and through which message. Rows are
-- only ever added: the trigger below refuses updates and deletes.
CREATE TABLE audit_log (
    id             bigserial   PRIMARY KEY,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    actor_id       uuid,
    subject        text        NOT NULL,
    subject_id     uuid,
    action         text        NOT NULL,
    detail         jsonb       NOT NULL DEFAULT '{}',
    message_id     uuid,
    correlation_id text
);

CREATE INDEX audit_log_by_subject ON audit_log (subject_id);

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
