//! Russian mobile numbers as people type them, normalised to E.164 so that a
//! typed number and a profile's number compare equal, and masked for logs.

/// Why a typed number is not a Russian mobile number. The variants never
/// carry the input, so the error can be logged as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error("phone number contains a character that is not a digit or a separator")]
    InvalidCharacter,
    #[error("phone number has {0} digits where 10 or 11 are expected")]
    WrongLength(usize),
    #[error("phone number is not a Russian mobile number")]
    NotRussianMobile,
}

/// Normalises a Russian mobile number typed in any common notation to
/// `+79001234567`.
///
/// Accepted: an optional leading `+`, digits, and separators (any Unicode
/// whitespace including non-breaking spaces, hyphens and dashes, dots,
/// parentheses). The digits must be `7` or `8` followed by ten digits (`+`
/// only before `7`), or ten digits alone. The ten national digits must start
/// with `9`: the service only sends SMS, so only mobile numbers are useful,
/// and this also rules out Kazakhstan, which shares the `+7` country code.
pub fn normalize_phone(input: &str) -> Result<String, PhoneError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(PhoneError::Empty);
    }
    let (international, rest) = match trimmed.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };

    let mut digits = String::with_capacity(11);
    for c in rest.chars() {
        if c.is_ascii_digit() {
            // Stops collecting early so that a pasted novel is not copied.
            if digits.len() > 11 {
                return Err(PhoneError::WrongLength(digits.len()));
            }
            digits.push(c);
        } else if !is_separator(c) {
            return Err(PhoneError::InvalidCharacter);
        }
    }

    let national = match (international, digits.len()) {
        (true, 11) if digits.starts_with('7') => &digits[1..],
        (true, 11) => return Err(PhoneError::NotRussianMobile),
        (false, 11) if digits.starts_with('7') || digits.starts_with('8') => &digits[1..],
        (false, 11) => return Err(PhoneError::NotRussianMobile),
        (false, 10) => digits.as_str(),
        (_, 0) => return Err(PhoneError::Empty),
        (_, n) => return Err(PhoneError::WrongLength(n)),
    };
    if !national.starts_with('9') {
        return Err(PhoneError::NotRussianMobile);
    }
    Ok(format!("+7{national}"))
}

fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(c, '-' | '.' | '(' | ')' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{00AD}')
}

/// Masks a phone for logs: `+79001234567` becomes `+7900***4567`. Anything
/// that is not a Russian mobile number in some notation becomes `***`, so a
/// mistyped number never reaches a log in full.
pub fn mask_phone(phone: &str) -> String {
    match normalize_phone(phone) {
        Ok(normalized) => format!("{}***{}", &normalized[..5], &normalized[8..]),
        Err(_) => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPECTED: &str = "+79001234567";

    #[test]
    fn common_russian_notations_normalise_to_e164() {
        let typed = [
            "+7 900 123-45-67",
            "8 (900) 123-45-67",
            "79001234567",
            "89001234567",
            "+79001234567",
            "8-900-123-45-67",
            " +7 900 1234567 ",
            "9001234567",
            "+7(900)1234567",
            "8.900.123.45.67",
            "+7\u{00A0}900\u{00A0}123\u{00A0}45\u{00A0}67",
            "+7\u{202F}900\u{202F}123-45-67",
            "8 900 123\u{2013}45\u{2013}67",
            "\t8 900 123 45 67\n",
            "+7 (900) 123 - 45 - 67",
        ];
        for input in typed {
            assert_eq!(normalize_phone(input).as_deref(), Ok(EXPECTED), "input {input:?}");
        }
    }

    #[test]
    fn empty_input_is_refused() {
        assert_eq!(normalize_phone(""), Err(PhoneError::Empty));
        assert_eq!(normalize_phone("   "), Err(PhoneError::Empty));
        assert_eq!(normalize_phone("+"), Err(PhoneError::Empty));
        assert_eq!(normalize_phone("( - )"), Err(PhoneError::Empty));
    }

    #[test]
    fn letters_and_stray_symbols_are_refused() {
        for input in [
            "+7 900 123-45-6a",
            "tel:+79001234567",
            "+7 900 123 45 67 доб. 1",
            "++79001234567",
            "8 900 123 45 67 +",
            "8/900/1234567",
            "+7 900 １２３ 45 67",
            "8 900 123_45_67",
        ] {
            assert_eq!(normalize_phone(input), Err(PhoneError::InvalidCharacter), "{input:?}");
        }
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert_eq!(normalize_phone("900123456"), Err(PhoneError::WrongLength(9)));
        assert_eq!(normalize_phone("+7900123456"), Err(PhoneError::WrongLength(10)));
        assert_eq!(normalize_phone("890012345678"), Err(PhoneError::WrongLength(12)));
        assert!(matches!(normalize_phone(&"9".repeat(10_000)), Err(PhoneError::WrongLength(_))));
    }

    #[test]
    fn other_countries_and_non_mobile_numbers_are_refused() {
        for input in [
            "+380 50 123 45 67", // Ukraine
            "+375 29 123 45 67", // Belarus, 12 digits
            "+1 900 123 45 67",  // wrong country, right length
            "+8 900 123 45 67",  // 8 is a trunk prefix, not a country code
            "+7 701 123 45 67",  // Kazakhstan mobile
            "8 (495) 123-45-67", // Moscow landline
            "8 800 123 45 67",   // toll-free
            "69001234567",
            "4951234567",
        ] {
            assert!(normalize_phone(input).is_err(), "{input:?} was accepted");
        }
        assert_eq!(normalize_phone("+7 701 123 45 67"), Err(PhoneError::NotRussianMobile));
    }

    #[test]
    fn masking_keeps_the_operator_code_and_the_last_four_digits() {
        assert_eq!(mask_phone("+79001234567"), "+7900***4567");
        assert_eq!(mask_phone("8 (900) 123-45-67"), "+7900***4567");
    }

    #[test]
    fn masking_something_unrecognisable_reveals_nothing() {
        assert_eq!(mask_phone(""), "***");
        assert_eq!(mask_phone("+380501234567"), "***");
        assert_eq!(mask_phone("Анна"), "***");
        assert_eq!(mask_phone("+7"), "***");
    }

    /// Every sample account's typed notation normalises to its profile phone.
    /// The sample lives outside the crate; without it the test has nothing to
    /// check, which is not a failure of this code.
    #[test]
    fn every_sample_account_phone_as_typed_normalises_to_its_phone() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/accounts.jsonl");
        let Ok(sample) = std::fs::read_to_string(path) else {
            eprintln!("skipped: {path} is absent");
            return;
        };
        let mut checked = 0;
        for line in sample.lines().filter(|line| !line.trim().is_empty()) {
            let account: serde_json::Value = serde_json::from_str(line).unwrap();
            let (Some(expected), Some(typed)) =
                (account["phone"].as_str(), account["phone_as_typed"].as_str())
            else {
                continue;
            };
            assert_eq!(normalize_phone(typed).as_deref(), Ok(expected), "typed {typed:?}");
            assert_eq!(normalize_phone(expected).as_deref(), Ok(expected));
            checked += 1;
        }
        assert!(checked > 0, "the sample at {path} holds no phones");
    }
}
