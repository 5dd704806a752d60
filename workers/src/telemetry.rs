//! Structured JSON logs through `tracing`. Spans carry message ids, types and
//! correlation ids; payloads, names, phones, birth dates and codes never go
//! into a log line.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the JSON subscriber; `TC_LOG` (or `RUST_LOG`) sets the filter.
pub fn init() {
    let filter = std::env::var("TC_LOG")
        .ok()
        .and_then(|value| EnvFilter::try_new(value).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info,lapin=warn,sqlx=warn"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_current_span(true)
                .with_span_list(false),
        )
        .try_init();
}

/// Error texts may quote the input that caused them (serde does, for one).
/// Before such a text reaches a log line or a dead-letter header, quoted
/// values are blanked and numbers of four digits or more masked, also when
/// written with spaces, dashes, dots or brackets between the digits (phones,
/// dates, codes as people type them).
pub fn redact_for_log(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut in_quotes = false;
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if in_quotes {
            if ch == '"' || ch == '`' {
                in_quotes = false;
                out.push('…');
                out.push(ch);
            }
            i += 1;
            continue;
        }
        // Ids are what logs are for: a UUID stays whole.
        if is_uuid_at(&chars, i) {
            out.extend(&chars[i..i + 36]);
            i += 36;
            continue;
        }
        if ch.is_ascii_digit() {
            let end = number_end(&chars, i);
            let digits = chars[i..end].iter().filter(|c| c.is_ascii_digit()).count();
            if digits >= 4 {
                out.push_str("####");
            } else {
                out.extend(&chars[i..end]);
            }
            i = end;
            continue;
        }
        if ch == '"' || ch == '`' {
            in_quotes = true;
        }
        out.push(ch);
        i += 1;
    }
    if in_quotes {
        out.push('…');
    }
    out
}

/// Where the number that starts with the digit at `start` ends: digits, and
/// at most two separators in a row between them ("8 (916) 123-45-67").
fn number_end(chars: &[char], start: usize) -> usize {
    let is_separator = |c: &char| matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{a0}');
    let mut end = start;
    let mut at = start;
    while at < chars.len() {
        if chars[at].is_ascii_digit() {
            at += 1;
            end = at;
            continue;
        }
        let gap = chars[at..].iter().take(3).take_while(|c| is_separator(c)).count();
        if gap == 0 || gap > 2 || !chars.get(at + gap).is_some_and(char::is_ascii_digit) {
            break;
        }
        at += gap;
    }
    end
}

/// Whether a UUID in its hyphenated form starts at `at` (and is not part of a
/// longer run of hex digits).
fn is_uuid_at(chars: &[char], at: usize) -> bool {
    let Some(candidate) = chars.get(at..at + 36) else { return false };
    let before_ok = at == 0 || !chars[at - 1].is_ascii_hexdigit();
    let after_ok = chars.get(at + 36).is_none_or(|c| !c.is_ascii_hexdigit());
    before_ok
        && after_ok
        && candidate.iter().enumerate().all(|(n, c)| match n {
            8 | 13 | 18 | 23 => *c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_and_long_digit_runs_are_hidden() {
        let text =
            r#"invalid value: string "Иванов", expected a date at line 1 column 12; +79001234567"#;
        let redacted = redact_for_log(text);
        assert!(!redacted.contains("Иванов"));
        assert!(!redacted.contains("9001234567"));
        assert!(redacted.contains("line 1 column 12"));
    }

    #[test]
    fn numbers_typed_with_separators_are_hidden_whole() {
        let text = "phone: +7 916 123 45 67; code: 482 913; born 01.01.1980; \
                    call 8 (916) 123-45-67 or 8-916-123-45-67";
        let redacted = redact_for_log(text);
        for part in ["916", "123", "45 67", "482", "913", "01.01", "1980"] {
            assert!(!redacted.contains(part), "{part} in {redacted}");
        }
        assert_eq!(
            redact_for_log("attempt 3 of 10, line 1 column 12"),
            "attempt 3 of 10, line 1 column 12"
        );
    }

    #[test]
    fn uuids_stay_whole_and_dates_do_not() {
        let text = "account 0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11 born 1990-05-17";
        let redacted = redact_for_log(text);
        assert!(redacted.contains("0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11"), "{redacted}");
        assert!(!redacted.contains("1990"), "{redacted}");
    }
}
