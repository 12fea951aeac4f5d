//! Kernel TLS (kTLS): after a server's handshake, the record layer is handed
//! to the kernel (`TCP_ULP "tls"`, then the keys and sequence numbers of
//! both directions), so READ replies go out with `sendfile` again and no
//! copy passes through this process. Where the kernel has no `tls` module
//! (or a step fails before the keys leave rustls), the session stays with
//! rustls in user space; that is remembered, so later sessions do not try.
//! TLS 1.3 sessions only; `FLEXNBD_KTLS=0` turns it off.
//!
//! Written by hand rather than with the `ktls` crate, which is built around
//! tokio streams; the steps are three socket options.

use super::TlsError;
use crate::stream::tls::{Kernel, TlsInfo};
use crate::stream::Stream;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

/// The kernel refused kernel TLS once: do not try again.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// `FLEXNBD_KTLS=0` keeps every session in user space.
fn wanted() -> bool {
    std::env::var_os("FLEXNBD_KTLS").is_none_or(|v| v != "0")
}

pub(super) enum Outcome {
    /// The kernel runs the record layer.
    Kernel(Stream),
    /// Kernel TLS is not available: the session stays with rustls.
    User(Box<(Stream, rustls::Connection, TlsInfo)>),
}

/// Hands a finished server session to the kernel where it can.
pub(super) fn hand_over(
    plain: Stream,
    mut conn: rustls::Connection,
    mut info: TlsInfo,
) -> Result<Outcome, TlsError> {
    if UNAVAILABLE.load(Relaxed) || !wanted() || plain.tcp().is_none() {
        return Ok(Outcome::User(Box::new((plain, conn, info))));
    }
    // TLS 1.3 only: the one version whose kernel hand-over was checked
    // end to end (scripts/ktls-vm-check.sh); TLS 1.2 stays in user space.
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => libc::TLS_1_3_VERSION,
        _ => return Ok(Outcome::User(Box::new((plain, conn, info)))),
    };
    // Nothing may be left inside rustls: no plaintext received, nothing to send.
    let pending = conn
        .process_new_packets()
        .map(|s| s.plaintext_bytes_to_read() > 0)
        .unwrap_or(true);
    if pending || conn.wants_write() {
        return Ok(Outcome::User(Box::new((plain, conn, info))));
    }
    let fd = plain.socket_fd();
    if let Err(e) = crate::sys::tcp_ulp_tls(fd) {
        if !UNAVAILABLE.swap(true, Relaxed) {
            info!("kernel TLS is not available ({e}); TLS runs in user space");
        }
        return Ok(Outcome::User(Box::new((plain, conn, info))));
    }
    // From here the keys leave rustls: a failure ends this connection.
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(TlsError::Handshake)?;
    let failed = |e: std::io::Error| {
        UNAVAILABLE.store(true, Relaxed);
        warn!("kernel TLS refused the session keys ({e}); later sessions stay in user space");
        TlsError::Io(e)
    };
    set(fd, libc::TLS_TX, version, secrets.tx).map_err(failed)?;
    set(fd, libc::TLS_RX, version, secrets.rx).map_err(failed)?;
    info.kernel = true;
    debug!("kernel TLS on for {}", plain.peer_name());
    Ok(Outcome::Kernel(Stream::Ktls(Arc::new(Kernel::new(
        plain, info,
    )))))
}

/// Gives one direction's key, IV and sequence number to the kernel.
fn set(
    fd: std::os::fd::BorrowedFd<'_>,
    dir: libc::c_int,
    version: u16,
    (seq, secrets): (u64, ConnectionTrafficSecrets),
) -> std::io::Result<()> {
    let rec_seq = seq.to_be_bytes();
    let unsupported = || std::io::Error::from(std::io::ErrorKind::Unsupported);
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(4);
            let info = libc::tls12_crypto_info_aes_gcm_128 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                },
                iv: iv.try_into().map_err(|_| unsupported())?,
                key: key.as_ref().try_into().map_err(|_| unsupported())?,
                salt: salt.try_into().map_err(|_| unsupported())?,
                rec_seq,
            };
            crate::sys::set_ktls(fd, dir, &info)
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(4);
            let info = libc::tls12_crypto_info_aes_gcm_256 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                },
                iv: iv.try_into().map_err(|_| unsupported())?,
                key: key.as_ref().try_into().map_err(|_| unsupported())?,
                salt: salt.try_into().map_err(|_| unsupported())?,
                rec_seq,
            };
            crate::sys::set_ktls(fd, dir, &info)
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            let info = libc::tls12_crypto_info_chacha20_poly1305 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
                },
                iv: iv.as_ref().try_into().map_err(|_| unsupported())?,
                key: key.as_ref().try_into().map_err(|_| unsupported())?,
                salt: [],
                rec_seq,
            };
            crate::sys::set_ktls(fd, dir, &info)
        }
        _ => Err(unsupported()),
    }
}
