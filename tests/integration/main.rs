//! Integration tests against the real RabbitMQ and PostgreSQL of this machine.
//! Every test gets a fresh database and a fresh topology prefix, so tests run
//! in parallel and leave nothing behind.

mod support;

mod dead_letters;
mod end_to_end;
mod invitations;
mod message_runtime;
mod recovery;
mod sms;
