//! One module per subcommand. Each prints what it found and says how the process should exit.

pub mod budget;
pub mod cancel;
pub mod cost;
pub mod list;
pub mod redeliver;
pub mod status;
pub mod submit;
pub mod topology;
pub mod watch;

use std::process::ExitCode;

use crate::client::Gateway;

/// What every gateway command needs.
#[derive(Debug)]
pub struct Context {
    pub gateway: Gateway,
    /// Print the gateway's JSON as it answered, instead of text for people.
    pub json: bool,
}

/// `jetcall watch ID` saw the job end other than delivered: undeliverable, or removed.
pub const NOT_DELIVERED: u8 = 3;

pub fn exit(success: bool) -> ExitCode {
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
