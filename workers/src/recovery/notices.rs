//! The Russian texts of the cabinet notifications about recovery, in one
//! place so that what each one reveals is reviewed together. Texts to the
//! contact name the truster by first name and last-name initial only.

use crate::sms::templates::without_final_period;

/// One notification: its kind (for the portal to style or group) and text.
pub struct Notice {
    pub kind: &'static str,
    pub text: String,
}

fn notice(kind: &'static str, text: impl Into<String>) -> Notice {
    Notice { kind, text: text.into() }
}

pub fn contact_asked_to_confirm(truster: &str, window_minutes: u64) -> Notice {
    notice(
        "recovery_requested",
        format!(
            "Запрошено восстановление пароля пользователя {truster}, вы его доверенное лицо. \
             Прежде чем подтвердить, свяжитесь с владельцем аккаунта и убедитесь, что просит \
             он сам, а не мошенники от его имени. Запрос действует {window_minutes} мин."
        ),
    )
}

pub fn truster_contact_was_asked() -> Notice {
    notice(
        "recovery_contact_asked",
        "Вашему доверенному лицу отправлен запрос на подтверждение восстановления пароля. \
         Если восстановление начали не вы, отмените запрос в личном кабинете.",
    )
}

pub fn truster_approved() -> Notice {
    notice(
        "recovery_approved",
        "Доверенное лицо подтвердило восстановление пароля. Портал выдаст временный пароль.",
    )
}

pub fn contact_approved(truster: &str) -> Notice {
    notice(
        "recovery_approved",
        format!(
            "Вы подтвердили восстановление пароля пользователя {}.",
            without_final_period(truster)
        ),
    )
}

pub fn truster_locked() -> Notice {
    notice(
        "recovery_locked",
        "Запрос на восстановление пароля заблокирован: код подтверждения трижды введён \
         неверно. Если восстановление начали вы, начните его заново.",
    )
}

pub fn truster_declined() -> Notice {
    notice(
        "recovery_declined",
        "Доверенное лицо отклонило запрос на восстановление пароля. Если восстановление \
         начали не вы, обратитесь в службу поддержки портала.",
    )
}

pub fn contact_cancelled(truster: &str) -> Notice {
    notice(
        "recovery_cancelled",
        format!(
            "Запрос на восстановление пароля пользователя {truster} отменён. \
             Ничего делать не нужно."
        ),
    )
}

pub fn truster_expired() -> Notice {
    notice(
        "recovery_expired",
        "Запрос на восстановление пароля истёк: доверенное лицо не подтвердило его вовремя.",
    )
}

pub fn contact_expired(truster: &str) -> Notice {
    notice(
        "recovery_expired",
        format!(
            "Запрос на восстановление пароля пользователя {truster} истёк. \
             Ничего делать не нужно."
        ),
    )
}

pub fn contact_code_expired() -> Notice {
    notice(
        "recovery_code_expired",
        "Срок действия кода подтверждения истёк. Чтобы получить новый код, подтвердите \
         запрос ещё раз.",
    )
}

pub fn sms_failed(was_code: bool) -> Notice {
    let text = if was_code {
        "Не удалось доставить SMS с кодом подтверждения на ваш телефон. Проверьте номер \
         в профиле портала и подтвердите запрос ещё раз."
    } else {
        "Не удалось доставить SMS на ваш телефон. Проверьте номер в профиле портала; \
         запрос ждёт вас в личном кабинете."
    };
    notice("sms_failed", text)
}
