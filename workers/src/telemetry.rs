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
/// values are blanked and long digit runs (phones, dates, codes) masked.
pub fn redact_for_log(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut in_quotes = false;
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if digits.len() >= 4 {
            out.push_str("####");
        } else {
            out.push_str(digits);
        }
        digits.clear();
    };
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
        if digits.is_empty() && is_uuid_at(&chars, i) {
            out.extend(&chars[i..i + 36]);
            i += 36;
            continue;
        }
        if ch.is_ascii_digit() {
            digits.push(ch);
            i += 1;
            continue;
        }
        flush(&mut digits, &mut out);
        if ch == '"' || ch == '`' {
            in_quotes = true;
        }
        out.push(ch);
        i += 1;
    }
    if in_quotes {
        out.push('…');
    }
    flush(&mut digits, &mut out);
    out
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
    fn uuids_stay_whole_and_dates_do_not() {
        let text = "account 0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11 born 1990-05-17";
        let redacted = redact_for_log(text);
        assert!(redacted.contains("0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11"), "{redacted}");
        assert!(!redacted.contains("1990"), "{redacted}");
    }
}
