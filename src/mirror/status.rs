//! What a migration reports (the migration keys of `status`) and what it
//! does once handed over; the control socket shows and parses these.

/// The migration keys of `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Bytes per second over the recent past (0 while nothing is sent).
    pub speed: u64,
    /// Seconds since the migration started.
    pub duration: u64,
    /// Known only while data moves.
    pub seconds_left: Option<u64>,
    /// Exact, never above the size.
    pub bytes_left: u64,
    /// Present when a limit is set.
    pub speed_limit: Option<u64>,
    /// Attempts so far, including the running one and those that failed to connect.
    pub attempts: u32,
    pub state: MigrationState,
    /// While retrying: seconds until the next attempt.
    pub retry_in: Option<u64>,
    /// Why the last attempt failed, if one did.
    pub last_error: Option<String>,
}

/// What a running migration is doing (`migration_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    /// Sending the image, then the passes over what changed.
    Copying,
    /// Waiting for (or connecting for) the next attempt after a failure.
    Retrying,
    /// Client writes are mirrored synchronously.
    Active,
    /// Requests are held while the last changes go out.
    Handover,
}

impl MigrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Copying => "copying",
            MigrationState::Retrying => "retrying",
            MigrationState::Active => "active",
            MigrationState::Handover => "handover",
        }
    }
}

/// What the source does once the migration has been handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorAction {
    /// Exit (the default).
    Exit,
    /// Remove the source file just before the final disconnect, then exit.
    Unlink,
    /// Keep serving (no hand-over).
    Nothing,
}
