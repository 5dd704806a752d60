-- The invitation step counts a truster's refusals for naming nobody in the
-- last hour before it looks a contact up; this keeps that count an index scan
-- however long the audit trail grows.
CREATE INDEX audit_log_failed_contact_lookups ON audit_log (actor_id, recorded_at)
    WHERE action = 'invitation_requested_refused' AND detail->>'reason' = 'contact_not_found';
