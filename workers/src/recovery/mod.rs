//! The recovery worker: a password recovery of a truster's account waits for
//! the truster's trusted contact, who confirms, receives a one-time code by
//! SMS and submits it; or declines; or the truster cancels; or time runs out.

mod cancelled;
pub mod code;
mod code_submitted;
mod confirmed;
mod declined;
mod expiry;
mod notices;
mod requested;
pub mod seal;
pub mod settings;
mod sms_failed;
mod store;

use trusted_contact_contracts::{Envelope, command_type};

pub use cancelled::end_active_for_disconnection;
pub use expiry::{
    CODE_DEADLINE, CodeDeadline, RECOVERY_DEADLINE, RecoveryDeadline, SweepReport, deadline_id,
    expire_recovery, sweep_due_recoveries, truster_has_open_request,
};
pub use settings::RecoverySettings;

use crate::{
    runtime::{Context, HandlerError, Source, Worker, WorkerSpec},
    sms::SMS_FAILED,
};

/// The worker's name, which also names its queue and the SMS it asks for.
pub const NAME: &str = "recovery";

pub const SPEC: WorkerSpec = WorkerSpec {
    name: NAME,
    bindings: &[
        (Source::Commands, command_type::RECOVERY_REQUESTED),
        (Source::Commands, command_type::RECOVERY_CONFIRMED),
        (Source::Commands, command_type::RECOVERY_CODE_SUBMITTED),
        (Source::Commands, command_type::RECOVERY_DECLINED),
        (Source::Commands, command_type::RECOVERY_CANCELLED),
        (Source::Direct, SMS_FAILED),
    ],
};

pub struct RecoveryWorker {
    settings: RecoverySettings,
}

impl RecoveryWorker {
    pub fn new(settings: RecoverySettings) -> Self {
        RecoveryWorker { settings }
    }
}

impl Worker for RecoveryWorker {
    fn spec(&self) -> WorkerSpec {
        SPEC
    }

    async fn handle(&self, context: &Context, message: &Envelope) -> Result<(), HandlerError> {
        let settings = &self.settings;
        match message.kind.as_str() {
            command_type::RECOVERY_REQUESTED => requested::handle(settings, context, message).await,
            command_type::RECOVERY_CONFIRMED => confirmed::handle(settings, context, message).await,
            command_type::RECOVERY_CODE_SUBMITTED => {
                code_submitted::handle(settings, context, message).await
            }
            command_type::RECOVERY_DECLINED => declined::handle(context, message).await,
            command_type::RECOVERY_CANCELLED => cancelled::handle(context, message).await,
            SMS_FAILED => sms_failed::handle(context, message).await,
            other => Err(HandlerError::permanent(anyhow::anyhow!(
                "the recovery worker does not handle {other:?}"
            ))),
        }
    }
}

/// Whole minutes for texts, rounded up so a text never promises less time
/// than there is.
fn whole_minutes(duration: std::time::Duration) -> u64 {
    duration.as_secs().div_ceil(60).max(1)
}

fn chrono_duration(duration: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}
