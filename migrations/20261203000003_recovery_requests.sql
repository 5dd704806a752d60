-- Password recovery requests that the truster's contact must approve, and the
-- declines kept for the fraud team.

CREATE TABLE recovery_requests (
    recovery_id      uuid        PRIMARY KEY,
    truster_id       uuid        NOT NULL,
    contact_id       uuid        NOT NULL,
    link_id          uuid        NOT NULL REFERENCES trust_links,
    status           text        NOT NULL CHECK (status IN (
        'awaiting_contact', 'code_sent', 'approved', 'declined', 'cancelled', 'expired', 'locked')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    decided_at       timestamptz,
    correlation_id   text        NOT NULL,
    -- Only a keyed hash (HMAC with the server secret) of the current code.
    code_hmac        bytea,
    code_expires_at  timestamptz,
    codes_sent       integer     NOT NULL DEFAULT 0,
    last_code_at     timestamptz,
    wrong_attempts   integer     NOT NULL DEFAULT 0
);

CREATE UNIQUE INDEX one_active_recovery_per_truster
    ON recovery_requests (truster_id) WHERE status IN ('awaiting_contact', 'code_sent');
CREATE INDEX active_recoveries_by_deadline
    ON recovery_requests (expires_at) WHERE status IN ('awaiting_contact', 'code_sent');
CREATE INDEX recoveries_by_truster_and_time ON recovery_requests (truster_id, created_at);

CREATE TABLE fraud_reports (
    id           bigserial   PRIMARY KEY,
    recovery_id  uuid        NOT NULL REFERENCES recovery_requests,
    truster_id   uuid        NOT NULL,
    contact_id   uuid        NOT NULL,
    reason       text        NOT NULL,
    reported_at  timestamptz NOT NULL DEFAULT now()
);
