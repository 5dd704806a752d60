//! Synthetic citizens for load tests: Russian names in Cyrillic, phones in the
//! notations people type, ages bunched around the 14 and 18 thresholds, and a
//! share of profiles that break an eligibility rule.

use chrono::{Datelike, Duration as Days, NaiveDate, Utc};
use rand::{Rng, RngExt};
use serde_json::{Value, json};
use trusted_contact_contracts::person::moscow_today;
use uuid::Uuid;

const MALE: &[&str] = &[
    "Александр",
    "Дмитрий",
    "Максим",
    "Сергей",
    "Андрей",
    "Алексей",
    "Артём",
    "Илья",
    "Кирилл",
    "Михаил",
    "Никита",
    "Матвей",
    "Роман",
    "Егор",
    "Иван",
    "Фёдор",
    "Пётр",
    "Григорий",
];
const FEMALE: &[&str] = &[
    "Анна",
    "Мария",
    "Елена",
    "Ольга",
    "Наталья",
    "Татьяна",
    "Ирина",
    "Екатерина",
    "Юлия",
    "Алёна",
    "Дарья",
    "Полина",
    "Софья",
    "Ксения",
    "Анна-Мария",
    "Ёлка",
];
const SURNAMES: &[&str] = &[
    "Иванов",
    "Смирнов",
    "Кузнецов",
    "Попов",
    "Васильев",
    "Петров",
    "Соколов",
    "Михайлов",
    "Новиков",
    "Фёдоров",
    "Морозов",
    "Волков",
    "Алексеев",
    "Лебедев",
    "Семёнов",
    "Егоров",
    "Павлов",
    "Козлов",
    "Степанов",
    "Николаев",
    "Орлов",
    "Андреев",
    "Макаров",
    "Зайцев",
];
const PATRONYMIC_ROOTS: &[&str] =
    &["Александров", "Дмитриев", "Сергеев", "Андреев", "Алексеев", "Михайлов", "Иванов", "Петров"];

/// One generated citizen and how the service should judge them.
#[derive(Debug, Clone)]
pub struct Citizen {
    pub account_id: Uuid,
    pub first_name: String,
    pub phone: Option<String>,
    /// The phone as the truster would type it.
    pub phone_as_typed: String,
    pub profile: Value,
}

/// Generates citizens whose phones are unique within one run.
pub struct CitizenFactory {
    phone_block: u32,
    next_phone: u32,
}

impl CitizenFactory {
    pub fn new(rng: &mut impl Rng) -> Self {
        // A random block per run keeps runs against one ledger from sharing
        // phones, which would make the phone look-up ambiguous.
        CitizenFactory { phone_block: rng.random_range(10..100), next_phone: 0 }
    }

    /// A citizen for `role` (`minimum_age` 14 for trusters, 18 for
    /// contacts). `ineligible_share` of them break one rule.
    pub fn citizen(
        &mut self,
        rng: &mut impl Rng,
        minimum_age: i32,
        ineligible_share: f64,
    ) -> Citizen {
        let female = rng.random_bool(0.5);
        let first = pick(rng, if female { FEMALE } else { MALE });
        let surname = pick(rng, SURNAMES);
        let last = if female { format!("{surname}а") } else { surname.to_owned() };
        let root = pick(rng, PATRONYMIC_ROOTS);
        let middle = if female { format!("{root}на") } else { format!("{root}ич") };
        self.next_phone += 1;
        let digits = format!("9{:02}{:07}", self.phone_block, self.next_phone);
        let mut phone = Some(format!("+7{digits}"));
        let mut citizenship = "RU";
        let mut verified = true;
        let mut has_passport = true;
        let mut birth = birth_date(rng, minimum_age);
        if rng.random_bool(ineligible_share) {
            match rng.random_range(0..5) {
                0 => citizenship = "KZ",
                1 => verified = false,
                2 => has_passport = false,
                3 => phone = None,
                _ => birth = one_day_short_of(minimum_age),
            }
        }
        let profile = json!({
            "first_name": first, "last_name": last, "middle_name": middle,
            "birth_date": birth, "citizenship": citizenship, "verified": verified,
            "has_passport": has_passport, "phone": phone,
        });
        Citizen {
            account_id: Uuid::new_v4(),
            first_name: first.to_owned(),
            phone,
            phone_as_typed: typed(rng, &digits),
            profile,
        }
    }
}

impl Citizen {
    pub fn account_updated(&self) -> Value {
        let mut payload = self.profile.clone();
        payload["account_id"] = json!(self.account_id);
        payload
    }
}

fn pick<'a>(rng: &mut impl Rng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

/// Mostly adults, with extra weight just under and just over the threshold.
fn birth_date(rng: &mut impl Rng, minimum_age: i32) -> NaiveDate {
    let today = moscow_today(Utc::now());
    let years = match rng.random_range(0..10) {
        0 => minimum_age,
        1 => minimum_age + 1,
        _ => rng.random_range(minimum_age.max(18)..85),
    };
    let birthday = NaiveDate::from_ymd_opt(today.year() - years, today.month(), 1).unwrap_or(today);
    birthday - Days::days(rng.random_range(0..360))
}

/// Born `minimum_age` years ago tomorrow: one day too young today.
fn one_day_short_of(minimum_age: i32) -> NaiveDate {
    let today = moscow_today(Utc::now());
    let tomorrow = today + Days::days(1);
    NaiveDate::from_ymd_opt(tomorrow.year() - minimum_age, tomorrow.month(), tomorrow.day())
        .unwrap_or(tomorrow - Days::days(365 * i64::from(minimum_age)))
}

fn typed(rng: &mut impl Rng, digits: &str) -> String {
    let (a, b, c, d) = (&digits[0..3], &digits[3..6], &digits[6..8], &digits[8..10]);
    match rng.random_range(0..5) {
        0 => format!("8 ({a}) {b}-{c}-{d}"),
        1 => format!("+7 {a} {b} {c} {d}"),
        2 => format!("7{digits}"),
        3 => format!("8-{a}-{b}-{c}-{d}"),
        _ => format!(" +7 {a} {b}{c}{d} "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trusted_contact_contracts::phone::normalize_phone;

    #[test]
    fn typed_phones_normalise_to_the_profile_phone() {
        let mut rng = rand::rng();
        let mut factory = CitizenFactory::new(&mut rng);
        for _ in 0..200 {
            let citizen = factory.citizen(&mut rng, 18, 0.0);
            let phone = citizen.phone.clone().unwrap();
            assert_eq!(normalize_phone(&citizen.phone_as_typed).unwrap(), phone);
        }
    }
}
