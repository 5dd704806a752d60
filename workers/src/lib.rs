pub mod sms;

pub fn x() {}
