//! TLS settings and handshakes (rustls with the ring provider): a
//! certificate directory in the layout nbdkit and qemu use
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, and for a client
//! `client-cert.pem`, `client-key.pem`) made into server and client
//! configurations, and the handshake that turns a plain [`Stream`] into a
//! TLS one after NBD_OPT_STARTTLS.

mod kernel;

use crate::stream::tls::{Channel, TlsInfo};
use crate::stream::{Deadline, Stream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Whether a server offers TLS (nbdkit's `--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// STARTTLS is refused (ERR_POLICY).
    Off,
    /// TLS is offered; plain clients are served too.
    On,
    /// Everything but STARTTLS and ABORT gets ERR_TLS_REQD until TLS is up.
    Require,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("bad TLS host name {0:?}")]
    HostName(String),
    #[error("TLS handshake failed: {0}")]
    Handshake(rustls::Error),
    #[error("TLS handshake: the peer closed the connection")]
    Closed,
    #[error("TLS handshake not completed in time")]
    TimedOut,
    #[error("TLS handshake: {0}")]
    Io(io::Error),
}

impl From<io::Error> for TlsError {
    fn from(e: io::Error) -> TlsError {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => TlsError::TimedOut,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => TlsError::Closed,
            _ => TlsError::Io(e),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.into(),
        cause,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.into(),
        cause,
    })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::Pem {
        path: path.into(),
        what: format!("no private key in it ({e})"),
    })
}

fn roots(dir: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let path = dir.join("ca-cert.pem");
    let mut store = rustls::RootCertStore::empty();
    for c in certs(&path)? {
        store.add(c).map_err(|e| TlsError::Pem {
            path: path.clone(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(store))
}

fn config_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// A server's TLS settings (`serve`, `listen`, `proxy` towards its clients).
#[derive(Debug)]
pub struct ServerTls {
    pub mode: TlsMode,
    pub verify_peer: bool,
    /// Where the certificates came from (a migration's default too).
    pub dir: PathBuf,
    config: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    /// Loads `dir`'s server certificate and key (and, with `verify_peer`, its
    /// CA, which must have signed every client's certificate).
    pub fn load(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<ServerTls, TlsError> {
        let chain = certs(&dir.join("server-cert.pem"))?;
        let key = key(&dir.join("server-key.pem"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = match verify_peer {
            true => {
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots(dir)?,
                    provider(),
                )
                .build()
                .map_err(config_error)?;
                builder.with_client_cert_verifier(v)
            }
            false => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("{}: {e}", dir.display())))?;
        // For kernel TLS: the keys go to the kernel after the handshake.
        config.enable_secret_extraction = true;
        Ok(ServerTls {
            mode,
            verify_peer,
            dir: dir.into(),
            config: Arc::new(config),
        })
    }

    /// The server side of the handshake on `plain`, all of it by `at`;
    /// then the record layer goes to the kernel where it can (kTLS).
    pub fn accept(&self, plain: Stream, at: Instant) -> Result<Stream, TlsError> {
        let conn = rustls::ServerConnection::new(self.config.clone()).map_err(config_error)?;
        let (plain, conn, info) = handshake(plain, rustls::Connection::Server(conn), at)?;
        match kernel::hand_over(plain, conn, info)? {
            kernel::Outcome::Kernel(s) => Ok(s),
            kernel::Outcome::User(u) => {
                let (plain, conn, info) = *u;
                Ok(Stream::Tls(Arc::new(Channel::new(plain, conn, info))))
            }
        }
    }
}

/// A client's TLS settings (`mirror`, `read`, `write`, the proxy's upstream).
#[derive(Debug)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry; by default the
    /// address connected to (`localhost` for a unix socket).
    hostname: Option<String>,
}

impl ClientTls {
    /// Loads `dir`'s CA (which must have signed the server's certificate)
    /// and, when both are there, the client certificate and key.
    pub fn load(dir: &Path, hostname: Option<String>) -> Result<ClientTls, TlsError> {
        if let Some(h) = &hostname {
            ServerName::try_from(h.clone()).map_err(|_| TlsError::HostName(h.clone()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots(dir)?);
        let (cert, key_path) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        let config = match cert.exists() || key_path.exists() {
            true => builder
                .with_client_auth_cert(certs(&cert)?, key(&key_path)?)
                .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?,
            false => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            config: Arc::new(config),
            hostname,
        })
    }

    /// The client side of the handshake on `plain`, all of it by `at`;
    /// `endpoint_host` is the name checked when no host name was given.
    pub fn connect(
        &self,
        plain: Stream,
        endpoint_host: &str,
        at: Instant,
    ) -> Result<Stream, TlsError> {
        let host = self.hostname.as_deref().unwrap_or(endpoint_host);
        let name =
            ServerName::try_from(host.to_owned()).map_err(|_| TlsError::HostName(host.into()))?;
        let conn =
            rustls::ClientConnection::new(self.config.clone(), name).map_err(config_error)?;
        let (plain, conn, info) = handshake(plain, rustls::Connection::Client(conn), at)?;
        Ok(Stream::Tls(Arc::new(Channel::new(plain, conn, info))))
    }
}

/// Runs a handshake to its end on a plain socket. Records are read one at
/// a time, so nothing past the handshake is taken off the socket (what
/// follows may be for the kernel's record layer).
fn handshake(
    plain: Stream,
    mut conn: rustls::Connection,
    at: Instant,
) -> Result<(Stream, rustls::Connection, TlsInfo), TlsError> {
    if matches!(plain, Stream::Tls(_) | Stream::Ktls(_)) {
        return Err(TlsError::Config("TLS inside TLS".into()));
    }
    {
        let d = Deadline::new(&plain, at);
        let mut io = &d;
        let mut records = Records::new(&d);
        while conn.is_handshaking() {
            if conn.wants_write() {
                conn.write_tls(&mut io)?;
                continue;
            }
            if conn.read_tls(&mut records)? == 0 {
                return Err(TlsError::Closed);
            }
            if let Err(e) = conn.process_new_packets() {
                // The alert saying why, best effort.
                while conn.wants_write() {
                    if conn.write_tls(&mut io).is_err() {
                        break;
                    }
                }
                return Err(TlsError::Handshake(e));
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut io)?;
        }
        io.flush()?;
    }
    let info = TlsInfo {
        version: conn
            .protocol_version()
            .map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
                v => format!("{v:?}"),
            })
            .unwrap_or_default(),
        cipher: conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default(),
        peer_subject: conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| subject(c)),
        kernel: false,
    };
    Ok((plain, conn, info))
}

/// Reads TLS records from the socket, never past the end of the current one.
struct Records<'a> {
    d: &'a Deadline<'a>,
    header: [u8; 5],
    got: usize,
    /// Body bytes of the current record still to read.
    left: usize,
}

impl<'a> Records<'a> {
    fn new(d: &'a Deadline<'a>) -> Records<'a> {
        Records {
            d,
            header: [0; 5],
            got: 0,
            left: 0,
        }
    }
}

impl io::Read for Records<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut r = self.d;
        if self.left == 0 {
            // The header first, to learn the body's length.
            let want = (self.header.len() - self.got).min(out.len());
            let n = r.read(&mut out[..want])?;
            self.header[self.got..self.got + n].copy_from_slice(&out[..n]);
            self.got += n;
            if self.got == self.header.len() {
                self.left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.got = 0;
            }
            return Ok(n);
        }
        let want = out.len().min(self.left);
        let n = r.read(&mut out[..want])?;
        self.left -= n;
        Ok(n)
    }
}

/// A certificate's subject, as `CN=…, O=…`.
fn subject(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.subject().to_string())
}
