//! The TLS options: `--tls off|on|require`, `--tls-certificates DIR`,
//! `--tls-verify-peer` for servers (`serve`, `listen`, `proxy`), and
//! `--tls`, `--tls-certificates DIR`, `--tls-hostname NAME` for clients
//! (`mirror`, `read`, `write`; the proxy's `--conn-tls…` for its upstream).

use crate::tls::{ClientTls, ServerTls, TlsMode};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A server's TLS options.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerTlsArgs {
    /// Offer TLS (`on`), require it (`require`: every option but STARTTLS
    /// and ABORT is refused with ERR_TLS_REQD until TLS is up), or refuse
    /// STARTTLS (`off`).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = TlsMode::Off)]
    pub tls: TlsMode,
    /// The directory with ca-cert.pem, server-cert.pem and server-key.pem
    /// (the layout nbdkit and qemu use).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Clients must present a certificate signed by the directory's
    /// ca-cert.pem.
    #[arg(long)]
    pub tls_verify_peer: bool,
}

impl ServerTlsArgs {
    /// The TLS settings, `None` with `--tls off`.
    pub fn load(&self) -> anyhow::Result<Option<Arc<ServerTls>>> {
        if self.tls == TlsMode::Off {
            if self.tls_verify_peer || self.tls_certificates.is_some() {
                bail!("--tls-certificates and --tls-verify-peer need --tls on or --tls require");
            }
            return Ok(None);
        }
        let Some(dir) = &self.tls_certificates else {
            bail!(
                "--tls {} needs --tls-certificates DIR (with ca-cert.pem, server-cert.pem \
                 and server-key.pem)",
                self.tls.as_str()
            );
        };
        let t = ServerTls::load(dir, self.tls, self.tls_verify_peer)
            .with_context(|| format!("TLS certificates in {}", dir.display()))?;
        Ok(Some(Arc::new(t)))
    }
}

/// A client's TLS options.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientTlsArgs {
    /// Connect with TLS (NBD_OPT_STARTTLS); the server's certificate must
    /// be signed by the directory's ca-cert.pem.
    #[arg(long)]
    pub tls: bool,
    /// The directory with ca-cert.pem and, to authenticate this side,
    /// client-cert.pem and client-key.pem.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address
    /// connected to; localhost for a unix socket).
    #[arg(long, value_name = "NAME")]
    pub tls_hostname: Option<String>,
}

impl ClientTlsArgs {
    pub fn load(&self) -> anyhow::Result<Option<Arc<ClientTls>>> {
        client_tls(
            self.tls,
            self.tls_certificates.as_deref(),
            self.tls_hostname.as_deref(),
            "--tls",
        )
    }
}

/// Client TLS settings from a flag, a directory and a host name; `flag`
/// names the option in messages.
pub fn client_tls(
    on: bool,
    dir: Option<&Path>,
    hostname: Option<&str>,
    flag: &str,
) -> anyhow::Result<Option<Arc<ClientTls>>> {
    if !on {
        if dir.is_some() || hostname.is_some() {
            bail!("{flag}-certificates and {flag}-hostname need {flag}");
        }
        return Ok(None);
    }
    let Some(dir) = dir else {
        bail!("{flag} needs {flag}-certificates DIR (with ca-cert.pem)");
    };
    let t = ClientTls::load(dir, hostname.map(str::to_owned))
        .with_context(|| format!("TLS certificates in {}", dir.display()))?;
    Ok(Some(Arc::new(t)))
}
