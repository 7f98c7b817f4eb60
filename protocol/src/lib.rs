//! Wire protocol of the kontext token broker.
//!
//! Everything a process needs to talk to `kontext-broker` lives here: the message
//! types ([`message`]), the typed errors with stable codes ([`BrokerError`]), the
//! framing and codec ([`codec`]), and the rules shared by broker and client:
//! paths ([`paths`]) and token validity ([`validity`]). The exact bytes are documented in `protocol/WIRE.md` and pinned by
//! golden tests, so any change to them is a deliberate [`PROTOCOL_VERSION`] bump.

pub mod codec;
mod error;
pub mod message;
pub mod paths;
mod secret;
pub mod validity;

pub use codec::{FrameReader, FrameWriter, WireCodec};
pub use error::{BrokerError, Error, ErrorCode};
pub use message::*;
pub use secret::Secret;

/// Version spoken by this crate. Bumped on any change to the encoded bytes.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame payload either side accepts or sends, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// A frame whose first byte arrived but whose last did not within this time closes the connection.
pub const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Profile used when the caller names none.
pub const DEFAULT_PROFILE: &str = "default";
