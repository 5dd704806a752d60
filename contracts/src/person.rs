//! Pure rules about people: whether a typed first name matches the passport's,
//! how old someone is on a Moscow calendar date, and whether a profile may
//! take part as a truster or a trusted contact. No I/O, so tests are exact.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, Utc};

use crate::{commands::AccountUpdated, phone::normalize_phone, reasons};

/// Moscow has kept UTC+3 all year since 2014, so a fixed offset gives the
/// Moscow calendar date without a time-zone database.
const MOSCOW: FixedOffset = match FixedOffset::east_opt(3 * 3600) {
    Some(offset) => offset,
    None => panic!("UTC+3 is a valid offset"),
};

/// The only citizenship that may take part (ISO 3166-1 alpha-2).
const RUSSIAN_FEDERATION: &str = "RU";

/// Whether a first name typed by a truster matches the one registered.
///
/// Case is ignored (Cyrillic included), as are surrounding spaces; `ё` counts
/// as `е`; hyphens, dashes and runs of whitespace are all one separator, so
/// "Анна-Мария", "анна - мария" and "АННА  МАРИЯ" match each other. Letters
/// are not otherwise folded: a Latin "a" typed into a Cyrillic name does not
/// match, because guessing at look-alikes would also match different names.
/// An empty name matches nothing.
pub fn names_match(entered: &str, registered: &str) -> bool {
    let entered = name_key(entered);
    !entered.is_empty() && entered == name_key(registered)
}

/// The comparable form of a name: lowercase words joined by single spaces.
fn name_key(name: &str) -> String {
    let mut key = String::with_capacity(name.len());
    let mut pending_separator = false;
    for c in name.chars() {
        if c.is_whitespace() || matches!(c, '-' | '\u{2010}'..='\u{2015}' | '\u{2212}') {
            pending_separator = true;
            continue;
        }
        match c {
            // Decomposed input (е + U+0308, и + U+0306) comes from some
            // keyboards and copy-pastes; fold it like the composed letters.
            '\u{0308}' if key.ends_with('е') => continue,
            '\u{0306}' if key.ends_with('и') => {
                key.pop();
                key.push('й');
                continue;
            }
            _ => {}
        }
        if pending_separator && !key.is_empty() {
            key.push(' ');
        }
        pending_separator = false;
        for lower in c.to_lowercase() {
            key.push(if lower == 'ё' { 'е' } else { lower });
        }
    }
    key
}

/// Age in whole years on the date `on`. Someone born on 29 February turns a
/// year older on 1 March in a non-leap year. A date before the birth gives 0.
pub fn age_on(birth_date: NaiveDate, on: NaiveDate) -> u32 {
    let years = on.year() - birth_date.year();
    let birthday_not_yet = (on.month(), on.day()) < (birth_date.month(), birth_date.day());
    let age = if birthday_not_yet { years - 1 } else { years };
    u32::try_from(age).unwrap_or(0)
}

/// The calendar date in Moscow at the instant `now`; ages are counted on it.
pub fn moscow_today(now: DateTime<Utc>) -> NaiveDate {
    now.with_timezone(&MOSCOW).date_naive()
}

/// The side a person takes in a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Truster,
    Contact,
}

impl Role {
    /// The minimum age for the role.
    pub fn minimum_age(self) -> u32 {
        match self {
            Role::Truster => 14,
            Role::Contact => 18,
        }
    }
}

/// What eligibility needs to know about an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub birth_date: NaiveDate,
    pub citizenship: String,
    pub verified: bool,
    pub has_passport: bool,
    pub phone: Option<String>,
}

impl From<&AccountUpdated> for Profile {
    fn from(account: &AccountUpdated) -> Self {
        Profile {
            birth_date: account.birth_date,
            citizenship: account.citizenship.clone(),
            verified: account.verified,
            has_passport: account.has_passport,
            phone: account.phone.clone(),
        }
    }
}

/// The first rule the profile breaks for `role` on the Moscow date `today`,
/// as a reason code, or `None` when the person may take part.
///
/// Checked in order: age, citizenship, verification, passport, phone.
/// Citizenship must be the ISO code `RU`, compared case-insensitively; other
/// spellings (`RUS`, "Россия") are refused, because the portal sends ISO
/// codes and guessing would let a malformed profile through. A phone counts
/// only if it is a Russian mobile number, since the service reaches people
/// by SMS.
pub fn eligibility_problems(
    profile: &Profile,
    role: Role,
    today: NaiveDate,
) -> Option<&'static str> {
    let codes = match role {
        Role::Truster => [
            reasons::TRUSTER_TOO_YOUNG,
            reasons::TRUSTER_NOT_CITIZEN,
            reasons::TRUSTER_NOT_VERIFIED,
            reasons::TRUSTER_NO_PASSPORT,
            reasons::TRUSTER_NO_PHONE,
        ],
        Role::Contact => [
            reasons::CONTACT_TOO_YOUNG,
            reasons::CONTACT_NOT_CITIZEN,
            reasons::CONTACT_NOT_VERIFIED,
            reasons::CONTACT_NO_PASSPORT,
            reasons::CONTACT_NO_PHONE,
        ],
    };
    let [too_young, not_citizen, not_verified, no_passport, no_phone] = codes;

    if age_on(profile.birth_date, today) < role.minimum_age() {
        return Some(too_young);
    }
    if !profile.citizenship.trim().eq_ignore_ascii_case(RUSSIAN_FEDERATION) {
        return Some(not_citizen);
    }
    if !profile.verified {
        return Some(not_verified);
    }
    if !profile.has_passport {
        return Some(no_passport);
    }
    let reachable_by_sms = profile.phone.as_deref().is_some_and(|p| normalize_phone(p).is_ok());
    if !reachable_by_sms {
        return Some(no_phone);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn eligible_born(birth_date: NaiveDate) -> Profile {
        Profile {
            birth_date,
            citizenship: "RU".to_owned(),
            verified: true,
            has_passport: true,
            phone: Some("+79001234567".to_owned()),
        }
    }

    #[test]
    fn names_match_ignoring_case_spaces_and_yo() {
        assert!(names_match("ЁЛКИНА", "Елкина"));
        assert!(names_match("елкина", "Ёлкина"));
        assert!(names_match("  Фёдор ", "Федор"));
        assert!(names_match("василиса", "Василиса"));
        assert!(names_match("ANNA", "anna"));
    }

    #[test]
    fn hyphens_and_runs_of_spaces_are_one_separator() {
        for typed in
            ["анна - мария", "АННА  МАРИЯ", "Анна–Мария", "Анна\u{00A0}Мария", "анна--мария"]
        {
            assert!(names_match(typed, "Анна-Мария"), "{typed:?}");
        }
        assert!(names_match("-Анна-", "Анна"));
    }

    #[test]
    fn different_names_do_not_match() {
        assert!(!names_match("Анна", "Анна-Мария"));
        assert!(!names_match("Аннa", "Анна"), "a Latin a is not a Cyrillic а");
        assert!(!names_match("Анна", "Инна"));
        assert!(!names_match("АннаМария", "Анна-Мария"));
        assert!(!names_match("", ""));
        assert!(!names_match("  - ", ""));
    }

    #[test]
    fn decomposed_letters_match_composed_ones() {
        assert!(names_match("Фе\u{0308}дор", "Фёдор"));
        assert!(names_match("Николаи\u{0306}", "Николай"));
        assert!(names_match("НИКОЛАИ\u{0306}", "Николай"));
    }

    #[test]
    fn age_counts_whole_years() {
        assert_eq!(age_on(date(2012, 12, 3), date(2026, 12, 2)), 13);
        assert_eq!(age_on(date(2012, 12, 3), date(2026, 12, 3)), 14);
        assert_eq!(age_on(date(2000, 1, 1), date(1999, 12, 31)), 0);
        assert_eq!(age_on(date(1938, 8, 30), date(2026, 12, 3)), 88);
    }

    #[test]
    fn a_leap_day_birthday_counts_on_the_first_of_march_in_common_years() {
        let born = date(2008, 2, 29);
        assert_eq!(age_on(born, date(2026, 2, 28)), 17);
        assert_eq!(age_on(born, date(2026, 3, 1)), 18);
        assert_eq!(age_on(born, date(2028, 2, 28)), 19);
        assert_eq!(age_on(born, date(2028, 2, 29)), 20);
    }

    #[test]
    fn the_moscow_date_turns_at_21_utc() {
        let before = "2026-12-02T20:59:59Z".parse::<DateTime<Utc>>().unwrap();
        let after = "2026-12-02T21:00:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(moscow_today(before), date(2026, 12, 2));
        assert_eq!(moscow_today(after), date(2026, 12, 3));
    }

    #[test]
    fn a_truster_one_day_short_of_fourteen_is_refused() {
        let profile = eligible_born(date(2012, 12, 4));
        let problem = eligibility_problems(&profile, Role::Truster, date(2026, 12, 3));
        assert_eq!(problem, Some(reasons::TRUSTER_TOO_YOUNG));
    }

    #[test]
    fn a_truster_is_accepted_on_their_fourteenth_birthday() {
        let profile = eligible_born(date(2012, 12, 3));
        assert_eq!(eligibility_problems(&profile, Role::Truster, date(2026, 12, 3)), None);
    }

    #[test]
    fn a_contact_one_day_short_of_eighteen_is_refused() {
        let profile = eligible_born(date(2008, 12, 4));
        let today = date(2026, 12, 3);
        assert_eq!(eligibility_problems(&profile, Role::Contact, today), Some("contact_too_young"));
        assert_eq!(eligibility_problems(&profile, Role::Truster, today), None);
        let today = date(2026, 12, 4);
        assert_eq!(eligibility_problems(&profile, Role::Contact, today), None);
    }

    #[test]
    fn a_contact_born_on_a_leap_day_is_eligible_from_the_first_of_march() {
        let profile = eligible_born(date(2008, 2, 29));
        let refused = eligibility_problems(&profile, Role::Contact, date(2026, 2, 28));
        assert_eq!(refused, Some(reasons::CONTACT_TOO_YOUNG));
        assert_eq!(eligibility_problems(&profile, Role::Contact, date(2026, 3, 1)), None);
    }

    #[test]
    fn each_missing_requirement_has_its_own_reason() {
        let today = date(2026, 12, 3);
        let adult = eligible_born(date(1990, 1, 1));
        // How to break one rule, and the reason expected for each role.
        type Case = (fn(&mut Profile), &'static str, &'static str);
        let cases: [Case; 5] = [
            (|p| p.citizenship = "UA".to_owned(), "truster_not_citizen", "contact_not_citizen"),
            (|p| p.verified = false, "truster_not_verified", "contact_not_verified"),
            (|p| p.has_passport = false, "truster_no_passport", "contact_no_passport"),
            (|p| p.phone = None, "truster_no_phone", "contact_no_phone"),
            (|p| p.phone = Some("+74951234567".to_owned()), "truster_no_phone", "contact_no_phone"),
        ];
        for (break_rule, as_truster, as_contact) in cases {
            let mut profile = adult.clone();
            break_rule(&mut profile);
            assert_eq!(eligibility_problems(&profile, Role::Truster, today), Some(as_truster));
            assert_eq!(eligibility_problems(&profile, Role::Contact, today), Some(as_contact));
        }
    }

    #[test]
    fn citizenship_is_the_iso_code_in_any_case() {
        let today = date(2026, 12, 3);
        let mut profile = eligible_born(date(1990, 1, 1));
        for accepted in ["RU", "ru", "Ru"] {
            profile.citizenship = accepted.to_owned();
            assert_eq!(eligibility_problems(&profile, Role::Contact, today), None);
        }
        for refused in ["RUS", "rus", "Россия", "", "BY"] {
            profile.citizenship = refused.to_owned();
            let problem = eligibility_problems(&profile, Role::Contact, today);
            assert_eq!(problem, Some(reasons::CONTACT_NOT_CITIZEN), "{refused:?}");
        }
    }

    #[test]
    fn age_is_reported_before_other_problems() {
        let mut profile = eligible_born(date(2015, 1, 1));
        profile.verified = false;
        profile.phone = None;
        let problem = eligibility_problems(&profile, Role::Truster, date(2026, 12, 3));
        assert_eq!(problem, Some(reasons::TRUSTER_TOO_YOUNG));
    }
}
