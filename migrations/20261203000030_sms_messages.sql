-- The SMS ledger: one row per idempotency key, so that a redelivered or
-- repeated request finds the SMS it already sent. The text is never stored
-- (it may hold a one-time code); the template kind says what was sent.

CREATE TABLE sms_messages (
    -- The row's own id, for the audit log's uuid subject_id.
    sms_id          uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    idempotency_key text        PRIMARY KEY,
    recipient_id    uuid        NOT NULL,
    -- Normalised to +7XXXXXXXXXX; as received when it could not be normalised
    -- (the row is then failed without a send).
    phone           text        NOT NULL,
    template        text        NOT NULL,
    -- The worker that asked, which hears of a permanent failure.
    requested_by    text        NOT NULL,
    -- queued: waiting for its next attempt; sending: an attempt has started
    -- (waiting for the shared rate limit or with the provider, or was when the
    -- worker died); sent and failed are final.
    status          text        NOT NULL
        CHECK (status IN ('queued', 'sending', 'sent', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    provider_id     text,
    -- The provider's stable code for the last transient failure, or for the
    -- permanent one when failed.
    last_error      text,
    failure_reason  text,
    -- The flow and the request that asked for the SMS.
    correlation_id  text,
    request_message_id uuid     NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    sent_at         timestamptz,
    failed_at       timestamptz,
    CHECK ((status = 'sent') = (provider_id IS NOT NULL)),
    CHECK ((status = 'failed') = (failure_reason IS NOT NULL))
);

CREATE INDEX sms_messages_by_recipient ON sms_messages (recipient_id, created_at);
CREATE INDEX sms_messages_unfinished ON sms_messages (updated_at)
    WHERE status IN ('queued', 'sending');
