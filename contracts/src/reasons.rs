//! The stable snake_case codes that refusal events carry in `reason`. The
//! portal maps each code to its own text, so a code, once published, is never
//! renamed or reused for another meaning.

// Eligibility of the truster (checked on invitation and on acceptance).
/// The truster is younger than 14 on the Moscow calendar date of the request.
pub const TRUSTER_TOO_YOUNG: &str = "truster_too_young";
/// The truster is not a citizen of the Russian Federation.
pub const TRUSTER_NOT_CITIZEN: &str = "truster_not_citizen";
/// The truster's account is not verified ("confirmed").
pub const TRUSTER_NOT_VERIFIED: &str = "truster_not_verified";
/// The truster's profile holds no Russian passport.
pub const TRUSTER_NO_PASSPORT: &str = "truster_no_passport";
/// The truster's profile holds no usable current (mobile) phone.
pub const TRUSTER_NO_PHONE: &str = "truster_no_phone";
/// No `account.updated` has been seen for the truster, so nothing is known.
pub const TRUSTER_UNKNOWN: &str = "truster_unknown";

// Eligibility of the contact.
/// The contact is younger than 18 on the Moscow calendar date of the request.
pub const CONTACT_TOO_YOUNG: &str = "contact_too_young";
/// The contact is not a citizen of the Russian Federation.
pub const CONTACT_NOT_CITIZEN: &str = "contact_not_citizen";
/// The contact's account is not verified ("confirmed").
pub const CONTACT_NOT_VERIFIED: &str = "contact_not_verified";
/// The contact's profile holds no Russian passport.
pub const CONTACT_NO_PASSPORT: &str = "contact_no_passport";
/// The contact's profile holds no usable current (mobile) phone.
pub const CONTACT_NO_PHONE: &str = "contact_no_phone";
/// No account has that phone, or its first name differs: one code for both,
/// so that the service cannot be used to probe who has an account.
pub const CONTACT_NOT_FOUND: &str = "contact_not_found";
/// The phone typed is not a Russian mobile number in any known notation.
pub const CONTACT_PHONE_INVALID: &str = "contact_phone_invalid";

// Invitations.
/// The truster named themselves as their own contact.
pub const SELF_INVITATION: &str = "self_invitation";
/// The truster already has an active contact; disconnect it first.
pub const CONTACT_ALREADY_ACTIVE: &str = "contact_already_active";
/// The invited person is already the trusted contact of 5 trusters.
pub const CONTACT_LIMIT_REACHED: &str = "contact_limit_reached";
/// The truster sent 5 invitations within the last hour.
pub const INVITATION_RATE_LIMITED: &str = "invitation_rate_limited";
/// The truster's invitations within the last hour named nobody
/// ([`CONTACT_NOT_FOUND`]) 5 times; further guesses must wait, so that the
/// first name behind a phone cannot be found by trying names one by one.
pub const CONTACT_LOOKUPS_EXHAUSTED: &str = "contact_lookups_exhausted";
/// No invitation has the id the command names.
pub const INVITATION_NOT_FOUND: &str = "invitation_not_found";
/// The actor is not the person the invitation was sent to.
pub const NOT_INVITED_CONTACT: &str = "not_invited_contact";
/// The invitation was already accepted or declined.
pub const INVITATION_NOT_PENDING: &str = "invitation_not_pending";
/// The 30 minutes to accept have passed.
pub const INVITATION_EXPIRED: &str = "invitation_expired";
/// A newer invitation from the same truster replaced this one.
pub const INVITATION_REPLACED: &str = "invitation_replaced";

// Disconnecting.
/// The actor is neither the truster nor the truster's active contact.
pub const NOT_A_PARTY: &str = "not_a_party";
/// The truster has no active contact (to disconnect, or to approve recovery).
pub const NO_ACTIVE_CONTACT: &str = "no_active_contact";
/// The contact may not leave while a recovery of the truster is active.
pub const RECOVERY_ACTIVE: &str = "recovery_active";

// Recovery requests.
/// The truster had 3 recovery requests within the last day.
pub const RECOVERY_RATE_LIMITED: &str = "recovery_rate_limited";
/// No recovery request has the id the command names.
pub const RECOVERY_NOT_FOUND: &str = "recovery_not_found";
/// The actor is not the active contact of the request's truster.
pub const NOT_TRUSTERS_CONTACT: &str = "not_trusters_contact";
/// Only the truster may cancel; the actor is someone else.
pub const NOT_THE_TRUSTER: &str = "not_the_truster";
/// The request was already approved, declined or cancelled.
pub const RECOVERY_NOT_ACTIVE: &str = "recovery_not_active";
/// The request's 60 minutes have passed.
pub const RECOVERY_EXPIRED: &str = "recovery_expired";
/// 3 wrong codes locked the request; the truster must start a new one.
pub const RECOVERY_LOCKED: &str = "recovery_locked";

// Codes.
/// The code submitted is not the one sent.
pub const CODE_INCORRECT: &str = "code_incorrect";
/// The code's 5 minutes have passed; the contact may ask for a new one.
pub const CODE_EXPIRED: &str = "code_expired";
/// A code was submitted before any code was sent for the request.
pub const CODE_NOT_SENT: &str = "code_not_sent";
/// 3 codes were already sent for this request.
pub const CODE_LIMIT_REACHED: &str = "code_limit_reached";
/// A new code was asked for less than 60 seconds after the previous one.
pub const CODE_TOO_SOON: &str = "code_too_soon";
/// The decline names a reason outside [`decline_reason::ALL`].
pub const INVALID_DECLINE_REASON: &str = "invalid_decline_reason";

// SMS delivery (internal `sms.failed`).
/// The gateway refused the message for good (bad number, blocked sender).
pub const SMS_REJECTED: &str = "sms_rejected";
/// Transient gateway failures went on past the attempt limit.
pub const SMS_ATTEMPTS_EXHAUSTED: &str = "sms_attempts_exhausted";

/// Every refusal code, so tests and documentation can enumerate them.
pub const ALL: &[&str] = &[
    TRUSTER_TOO_YOUNG,
    TRUSTER_NOT_CITIZEN,
    TRUSTER_NOT_VERIFIED,
    TRUSTER_NO_PASSPORT,
    TRUSTER_NO_PHONE,
    TRUSTER_UNKNOWN,
    CONTACT_TOO_YOUNG,
    CONTACT_NOT_CITIZEN,
    CONTACT_NOT_VERIFIED,
    CONTACT_NO_PASSPORT,
    CONTACT_NO_PHONE,
    CONTACT_NOT_FOUND,
    CONTACT_PHONE_INVALID,
    SELF_INVITATION,
    CONTACT_ALREADY_ACTIVE,
    CONTACT_LIMIT_REACHED,
    INVITATION_RATE_LIMITED,
    CONTACT_LOOKUPS_EXHAUSTED,
    INVITATION_NOT_FOUND,
    NOT_INVITED_CONTACT,
    INVITATION_NOT_PENDING,
    INVITATION_EXPIRED,
    INVITATION_REPLACED,
    NOT_A_PARTY,
    NO_ACTIVE_CONTACT,
    RECOVERY_ACTIVE,
    RECOVERY_RATE_LIMITED,
    RECOVERY_NOT_FOUND,
    NOT_TRUSTERS_CONTACT,
    NOT_THE_TRUSTER,
    RECOVERY_NOT_ACTIVE,
    RECOVERY_EXPIRED,
    RECOVERY_LOCKED,
    CODE_INCORRECT,
    CODE_EXPIRED,
    CODE_NOT_SENT,
    CODE_LIMIT_REACHED,
    CODE_TOO_SOON,
    INVALID_DECLINE_REASON,
    SMS_REJECTED,
    SMS_ATTEMPTS_EXHAUSTED,
];

/// The schema of a `reason` field that carries a refusal code: one of
/// [`ALL`], listed so that clients in other languages see every code.
pub fn refusal_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ALL,
        "description": "A stable snake_case refusal code; a code, once published, \
                        keeps its meaning.",
    })
}

/// The schema of the reason a contact gives for declining a recovery.
pub fn decline_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": decline_reason::ALL,
        "description": "Why the contact declined; read by the fraud team.",
    })
}

/// The reasons a contact may give in `recovery.declined`. The fraud team
/// reads them, so free text is not accepted.
pub mod decline_reason {
    /// The contact believes fraudsters are behind the request.
    pub const SUSPECTED_FRAUD: &str = "suspected_fraud";
    /// The truster told the contact they did not start a recovery.
    pub const NOT_REQUESTED_BY_TRUSTER: &str = "not_requested_by_truster";
    /// Anything else.
    pub const OTHER: &str = "other";

    pub const ALL: &[&str] = &[SUSPECTED_FRAUD, NOT_REQUESTED_BY_TRUSTER, OTHER];

    /// Whether `reason` is one the contact may give, exactly as spelled here.
    pub fn is_valid(reason: &str) -> bool {
        ALL.contains(&reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn is_snake_case(code: &str) -> bool {
        !code.is_empty()
            && !code.starts_with('_')
            && !code.ends_with('_')
            && !code.contains("__")
            && code.chars().all(|c| c.is_ascii_lowercase() || c == '_')
    }

    #[test]
    fn every_code_is_snake_case_and_unique() {
        let all = ALL.iter().chain(decline_reason::ALL);
        let mut seen = HashSet::new();
        for code in all {
            assert!(is_snake_case(code), "{code} is not snake_case");
            assert!(seen.insert(*code), "{code} appears twice");
        }
    }

    #[test]
    fn only_the_listed_decline_reasons_are_valid() {
        assert!(decline_reason::is_valid("suspected_fraud"));
        assert!(decline_reason::is_valid("other"));
        assert!(!decline_reason::is_valid("Suspected_Fraud"));
        assert!(!decline_reason::is_valid("i just don't like it"));
        assert!(!decline_reason::is_valid(""));
    }
}
