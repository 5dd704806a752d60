-- What the invitation dispatch worker needs beyond the trust ledger: the
-- command that opened an invitation (its expiry deadline is derived from it)
-- and the idempotency key of the SMS that told the contact, so that an
-- `sms.failed` reply finds its invitation.

ALTER TABLE invitations ADD COLUMN request_message_id uuid;
ALTER TABLE invitations ADD COLUMN sms_idempotency_key text;

CREATE INDEX invitations_by_sms_key ON invitations (sms_idempotency_key)
    WHERE sms_idempotency_key IS NOT NULL;
CREATE INDEX invitations_by_contact ON invitations (contact_id);
