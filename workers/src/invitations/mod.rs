//! The invitation dispatch worker: keeps the ledger's copy of accounts, and
//! opens, accepts, declines and disconnects trusted-contact connections. One
//! file per step; invitation expiry lives here too and the sweeper calls it.

mod accepted;
mod account_updated;
mod declined;
mod disconnect;
pub mod expiry;
mod ledger_queries;
mod requested;
mod sms_failed;

use std::time::Duration;

use anyhow::anyhow;
use trusted_contact_contracts::{Envelope, command_type};

use crate::{
    runtime::{Context, HandlerError, Source, Worker, WorkerSpec},
    settings::{parse_var, secs_var},
    sms::SMS_FAILED,
};

pub const INVITATIONS: WorkerSpec = WorkerSpec {
    name: "invitations",
    bindings: &[
        (Source::Commands, command_type::ACCOUNT_UPDATED),
        (Source::Commands, command_type::INVITATION_REQUESTED),
        (Source::Commands, command_type::INVITATION_ACCEPTED),
        (Source::Commands, command_type::INVITATION_DECLINED),
        (Source::Commands, command_type::CONTACT_DISCONNECT_REQUESTED),
        (Source::Direct, SMS_FAILED),
    ],
};

/// The invitation rules that operators may tune.
#[derive(Debug, Clone)]
pub struct InvitationSettings {
    /// How long the contact has to accept (`TC_INVITATION_WINDOW_SECS`).
    pub window: Duration,
    /// Invitations one truster may send per hour (`TC_INVITATIONS_PER_HOUR`).
    pub invitations_per_hour: i64,
    /// Invitations per truster and hour that may name nobody before the
    /// truster must wait (`TC_FAILED_LOOKUPS_PER_HOUR`).
    pub failed_lookups_per_hour: i64,
}

impl InvitationSettings {
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(InvitationSettings {
            window: secs_var("TC_INVITATION_WINDOW_SECS", 1800)?,
            invitations_per_hour: parse_var("TC_INVITATIONS_PER_HOUR", 5)?,
            failed_lookups_per_hour: parse_var("TC_FAILED_LOOKUPS_PER_HOUR", 5)?,
        })
    }
}

impl Default for InvitationSettings {
    fn default() -> Self {
        InvitationSettings {
            window: Duration::from_secs(1800),
            invitations_per_hour: 5,
            failed_lookups_per_hour: 5,
        }
    }
}

pub struct Invitations {
    pub settings: InvitationSettings,
}

impl Worker for Invitations {
    fn spec(&self) -> WorkerSpec {
        INVITATIONS
    }

    async fn handle(&self, context: &Context, message: &Envelope) -> Result<(), HandlerError> {
        match message.kind.as_str() {
            command_type::ACCOUNT_UPDATED => account_updated::handle(context, message).await,
            command_type::INVITATION_REQUESTED => {
                requested::handle(context, &self.settings, message).await
            }
            command_type::INVITATION_ACCEPTED => accepted::handle(context, message).await,
            command_type::INVITATION_DECLINED => declined::handle(context, message).await,
            command_type::CONTACT_DISCONNECT_REQUESTED => {
                disconnect::handle(context, message).await
            }
            SMS_FAILED => sms_failed::handle(context, message).await,
            other => Err(HandlerError::permanent(anyhow!("invitations cannot handle {other}"))),
        }
    }
}
