//! The Trusted Contact message catalogue: the envelope every message travels
//! in, the commands the portal sends, the events the service answers with, and
//! the names of the exchanges and queues they travel through.

pub mod envelope;
pub mod names;
pub mod phone;
pub mod reasons;

pub use envelope::{Envelope, EnvelopeError, SUPPORTED_VERSION};
pub use names::Topology;
pub use phone::{PhoneError, mask_phone, normalize_phone};
