-- Finding the audit rows a message wrote: the recovery worker maps a failed
-- SMS back to its recovery request through the step that asked for it.
CREATE INDEX audit_log_by_message ON audit_log (message_id);
