-- The message runtime's own tables: which messages each consumer has handled
-- (the inbox) and which outgoing messages still await the broker's confirm
-- (the outbox). Both are written in the same transaction as the state change.

CREATE TABLE inbox (
    consumer    text        NOT NULL,
    message_id  uuid        NOT NULL,
    message_type text       NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

CREATE TABLE outbox (
    id             bigserial   PRIMARY KEY,
    message_id     uuid        NOT NULL UNIQUE,
    message_type   text        NOT NULL,
    -- The exchange is stored as published (prefix included); an empty name is
    -- the default exchange, used for direct and delayed delivery to a queue.
    exchange       text        NOT NULL,
    routing_key    text        NOT NULL,
    -- Non-zero: the message goes through a broker-side delay queue first.
    delay_ms       bigint      NOT NULL DEFAULT 0,
    correlation_id text,
    causation_id   text,
    body           bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    sent_at        timestamptz
);

CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
