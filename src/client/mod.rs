//! NBD client.
