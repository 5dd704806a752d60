//! The Russian texts of every SMS the service sends, kept in one place so that
//! wording and what they may reveal are reviewed together. Every SMS goes to
//! the trusted contact and names the truster by first name and last-name
//! initial only ("Иван П.").

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::recovery::seal::CodeSeal;

/// The invitation window of requests queued before the notice carried its
/// own: the default window.
fn default_invitation_minutes() -> u32 {
    30
}

/// One SMS to the trusted contact, with what its text needs.
///
/// `truster_short_name` is built by [`short_name`]; the templates trust it to
/// hold nothing more than a first name and an initial. `Debug` shows only
/// [`Self::kind`], so neither a code nor a name reaches a log through it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "template", rename_all = "snake_case")]
pub enum SmsTemplate {
    /// Points the contact to the invitation waiting in their personal account.
    InvitationNotice {
        truster_short_name: String,
        /// The window the invitation was opened with, in whole minutes.
        #[serde(default = "default_invitation_minutes")]
        valid_minutes: u32,
    },
    /// A recovery needs the contact; asks them to call the truster before
    /// confirming.
    RecoveryRequestNotice {
        truster_short_name: String,
    },
    /// The one-time code that approves a recovery.
    /// The code travels sealed (see `recovery::seal`): the SMS request
    /// passes through the outbox and the broker, which must not hold it in
    /// clear. Only [`SmsTemplate::render`] opens it, in memory.
    RecoveryCode {
        sealed_code: String,
        truster_short_name: String,
        valid_minutes: u32,
    },
    InvitationAccepted {
        truster_short_name: String,
    },
    ContactDisconnected {
        truster_short_name: String,
    },
    RecoveryApproved {
        truster_short_name: String,
    },
    RecoveryDeclined {
        truster_short_name: String,
    },
    RecoveryCancelled {
        truster_short_name: String,
    },
    RecoveryExpired {
        truster_short_name: String,
    },
}

impl SmsTemplate {
    /// The serde tag, safe to log and to use as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvitationNotice { .. } => "invitation_notice",
            Self::RecoveryRequestNotice { .. } => "recovery_request_notice",
            Self::RecoveryCode { .. } => "recovery_code",
            Self::InvitationAccepted { .. } => "invitation_accepted",
            Self::ContactDisconnected { .. } => "contact_disconnected",
            Self::RecoveryApproved { .. } => "recovery_approved",
            Self::RecoveryDeclined { .. } => "recovery_declined",
            Self::RecoveryCancelled { .. } => "recovery_cancelled",
            Self::RecoveryExpired { .. } => "recovery_expired",
        }
    }

    /// The text as the contact will read it; `seal` opens a sealed code.
    pub fn render(&self, seal: &CodeSeal) -> anyhow::Result<String> {
        Ok(match self {
            Self::InvitationNotice { truster_short_name: name, valid_minutes } => format!(
                "Пользователь {name} приглашает вас стать доверенным лицом. \
                 Ответьте в личном кабинете портала в течение {valid_minutes} {}.",
                minutes_word(*valid_minutes)
            ),
            Self::RecoveryRequestNotice { truster_short_name: name } => format!(
                "Запрошено восстановление пароля пользователя {name}, вы доверенное лицо. \
                 Прежде чем подтвердить в личном кабинете, позвоните владельцу аккаунта \
                 и убедитесь, что просит он сам, а не мошенники от его имени."
            ),
            Self::RecoveryCode { sealed_code, truster_short_name: name, valid_minutes } => format!(
                "Код {} для подтверждения восстановления пароля пользователя {}. \
                 Никому не сообщайте код, даже сотрудникам портала. \
                 Код действует {valid_minutes} {}.",
                seal.open(sealed_code)?,
                without_final_period(name),
                minutes_word(*valid_minutes)
            ),
            Self::InvitationAccepted { truster_short_name: name } => {
                format!("Вы стали доверенным лицом пользователя {}.", without_final_period(name))
            }
            Self::ContactDisconnected { truster_short_name: name } => {
                format!("Вы больше не доверенное лицо пользователя {}.", without_final_period(name))
            }
            Self::RecoveryApproved { truster_short_name: name } => {
                format!(
                    "Вы подтвердили восстановление пароля пользователя {}.",
                    without_final_period(name)
                )
            }
            Self::RecoveryDeclined { truster_short_name: name } => format!(
                "Вы отклонили восстановление пароля пользователя {}. \
                 Спасибо за бдительность.",
                without_final_period(name)
            ),
            Self::RecoveryCancelled { truster_short_name: name } => format!(
                "Запрос на восстановление пароля пользователя {name} отменён. \
                 Ничего делать не нужно."
            ),
            Self::RecoveryExpired { truster_short_name: name } => format!(
                "Запрос на восстановление пароля пользователя {name} истёк. \
                 Ничего делать не нужно."
            ),
        })
    }
}

impl fmt::Debug for SmsTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SmsTemplate({})", self.kind())
    }
}

/// "Иван П." from a first and last name; only the first name when the last is
/// empty.
pub fn short_name(first: &str, last: &str) -> String {
    let first = first.trim();
    match last.trim().chars().next() {
        Some(initial) => format!("{first} {}.", initial.to_uppercase()),
        None => first.to_owned(),
    }
}

/// The accusative form that follows a number: 1 минуту, 2 минуты, 5 минут, 21
/// минуту.
fn minutes_word(n: u32) -> &'static str {
    match (n % 10, n % 100) {
        (_, 11..=14) => "минут",
        (1, _) => "минуту",
        (2..=4, _) => "минуты",
        _ => "минут",
    }
}

/// A short name ends with the initial's period; where it also ends the
/// sentence, that one period serves both.
pub fn without_final_period(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal() -> CodeSeal {
        CodeSeal::new(&crate::settings::Secret::new("a test secret long enough to key")).unwrap()
    }

    fn ivan() -> String {
        short_name("Иван", "Петров")
    }

    #[test]
    fn a_short_name_is_the_first_name_and_the_last_initial() {
        assert_eq!(ivan(), "Иван П.");
        assert_eq!(short_name("  Анна ", " ёлкина"), "Анна Ё.");
    }

    #[test]
    fn a_short_name_without_last_name_is_the_first_name_alone() {
        assert_eq!(short_name("Иван", ""), "Иван");
        assert_eq!(short_name("Иван", "   "), "Иван");
    }

    #[test]
    fn the_code_message_names_the_action_carries_the_code_and_the_warning() {
        let sealed_code = seal().seal("482913").unwrap();
        assert!(!sealed_code.contains("482913"));
        let text =
            SmsTemplate::RecoveryCode { sealed_code, truster_short_name: ivan(), valid_minutes: 5 }
                .render(&seal())
                .unwrap();
        assert!(text.contains("482913"));
        assert!(text.contains("восстановления пароля пользователя Иван П."));
        assert!(text.contains("Никому не сообщайте код, даже сотрудникам портала"));
        assert!(text.contains("действует 5 минут."));
        assert!(!text.contains("Петров"));
    }

    #[test]
    fn the_recovery_notice_asks_to_call_the_truster_before_confirming() {
        let text = SmsTemplate::RecoveryRequestNotice { truster_short_name: ivan() }
            .render(&seal())
            .unwrap();
        assert!(text.contains("Прежде чем подтвердить"));
        assert!(text.contains("позвоните"));
    }

    #[test]
    fn no_template_reveals_the_full_last_name() {
        let name = ivan();
        let all = [
            SmsTemplate::InvitationNotice { truster_short_name: name.clone(), valid_minutes: 30 },
            SmsTemplate::RecoveryRequestNotice { truster_short_name: name.clone() },
            SmsTemplate::InvitationAccepted { truster_short_name: name.clone() },
            SmsTemplate::ContactDisconnected { truster_short_name: name.clone() },
            SmsTemplate::RecoveryApproved { truster_short_name: name.clone() },
            SmsTemplate::RecoveryDeclined { truster_short_name: name.clone() },
            SmsTemplate::RecoveryCancelled { truster_short_name: name.clone() },
            SmsTemplate::RecoveryExpired { truster_short_name: name.clone() },
        ];
        for template in all {
            let text = template.render(&seal()).unwrap();
            assert!(text.contains("Иван П."), "{text}");
            assert!(!text.contains("Петров"), "{text}");
        }
    }

    #[test]
    fn the_invitation_notice_gives_the_window_it_was_opened_with() {
        let notice = |minutes| SmsTemplate::InvitationNotice {
            truster_short_name: ivan(),
            valid_minutes: minutes,
        };
        assert!(notice(30).render(&seal()).unwrap().ends_with("в течение 30 минут."));
        assert!(notice(1).render(&seal()).unwrap().ends_with("в течение 1 минуту."));
        let queued_before = serde_json::json!({
            "template": "invitation_notice", "truster_short_name": "Иван П."
        });
        let notice: SmsTemplate = serde_json::from_value(queued_before).unwrap();
        assert!(notice.render(&seal()).unwrap().ends_with("в течение 30 минут."));
    }

    #[test]
    fn minutes_agree_with_their_number() {
        let words: Vec<_> = [1, 2, 5, 11, 21, 22, 60].map(minutes_word).into();
        assert_eq!(words, ["минуту", "минуты", "минут", "минут", "минуту", "минуты", "минут"]);
    }

    #[test]
    fn debug_output_shows_neither_the_code_nor_the_name() {
        let template = SmsTemplate::RecoveryCode {
            sealed_code: seal().seal("482913").unwrap(),
            truster_short_name: ivan(),
            valid_minutes: 5,
        };
        assert_eq!(format!("{template:?}"), "SmsTemplate(recovery_code)");
    }

    #[test]
    fn templates_travel_as_snake_case_tags() -> serde_json::Result<()> {
        let template = SmsTemplate::RecoveryCode {
            sealed_code: "00aa".into(),
            truster_short_name: ivan(),
            valid_minutes: 5,
        };
        let json = serde_json::to_value(&template)?;
        assert_eq!(json["template"], "recovery_code");
        assert_eq!(serde_json::from_value::<SmsTemplate>(json)?, template);
        Ok(())
    }
}
