//! How a handler says that a message failed, classified where the failure
//! happens: permanent failures are dead-lettered at once, transient ones are
//! retried through the broker with a growing delay.

use std::time::Duration;

use trusted_contact_contracts::EnvelopeError;

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The same message will never succeed: malformed input, a payload that
    /// breaks the contract, a state the ledger cannot be in.
    #[error("permanent failure: {0:#}")]
    Permanent(anyhow::Error),
    /// The world may be different on the next attempt: the database or a
    /// provider was unreachable, timed out or asked us to slow down.
    #[error("transient failure: {source:#}")]
    Transient {
        source: anyhow::Error,
        /// A lower bound on the next attempt, when the other side named one.
        retry_after: Option<Duration>,
    },
}

impl HandlerError {
    pub fn permanent(error: impl Into<anyhow::Error>) -> Self {
        HandlerError::Permanent(error.into())
    }

    pub fn transient(error: impl Into<anyhow::Error>) -> Self {
        HandlerError::Transient { source: error.into(), retry_after: None }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, HandlerError::Transient { .. })
    }
}

impl From<EnvelopeError> for HandlerError {
    fn from(error: EnvelopeError) -> Self {
        HandlerError::Permanent(error.into())
    }
}

/// Database errors are transient unless they say the statement itself is
/// wrong: a lost connection or a serialisation conflict heals on retry, a
/// constraint violation or a type mismatch does not.
impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> Self {
        let permanent = match &error {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // Class 23 (integrity), 22 (data) and 42 (syntax or access)
                // say the statement will fail the same way next time; 40001
                // and 40P01 (serialisation, deadlock) are in class 40 and heal.
                code.starts_with("23") || code.starts_with("22") || code.starts_with("42")
            }
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::RowNotFound => true,
            _ => false,
        };
        if permanent {
            HandlerError::Permanent(error.into())
        } else {
            HandlerError::transient(error)
        }
    }
}

/// Anything a handler did not classify itself is taken as transient: a
/// retry costs little, and the attempt limit still dead-letters it.
impl From<anyhow::Error> for HandlerError {
    fn from(error: anyhow::Error) -> Self {
        match error.downcast::<sqlx::Error>() {
            Ok(sql) => HandlerError::from(sql),
            Err(other) => HandlerError::transient(other),
        }
    }
}
