//! Trusted Contact: the workers that let an account owner's trusted contact
//! approve every password recovery, the message runtime they share, and the
//! operators' tools.

pub mod app;
pub mod bench;
pub mod demo;
pub mod dlq;
pub mod invitations;
pub mod ledger;
pub mod loadgen;
pub mod portal;
pub mod recovery;
pub mod runtime;
pub mod settings;
pub mod sms;
pub mod sweeper;
pub mod telemetry;
