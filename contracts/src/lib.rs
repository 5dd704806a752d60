//! The Trusted Contact message catalogue: the envelope every message travels
//! in, the commands the portal sends, the events the service answers with, and
//! the names of the exchanges and queues they travel through.

pub mod commands;
pub mod envelope;
pub mod events;
pub mod names;
pub mod person;
pub mod phone;
pub mod reasons;
pub mod schema;

pub use commands::command_type;
pub use envelope::{Envelope, EnvelopeError, SUPPORTED_VERSION};
pub use events::event_type;
pub use names::Topology;
pub use person::{Profile, Role, age_on, eligibility_problems, moscow_today, names_match};
pub use phone::{PhoneError, mask_phone, normalize_phone};
pub use schema::json_schemas;

use schemars::JsonSchema;
use serde::{Serialize, de::DeserializeOwned};

/// A payload type of the catalogue, tied to the message type it travels
/// under, so code that builds or reads an envelope cannot pair a payload with
/// the wrong type string.
pub trait Message: Serialize + DeserializeOwned + JsonSchema {
    /// The envelope's `type`, which is also the routing key.
    const TYPE: &'static str;
}
