//! Certificates made by the test itself (rcgen), never committed: a CA with
//! a server and a client certificate, an expired server and client
//! certificate, and a second CA with its own server and client, each laid
//! out in a directory as nbdkit and qemu expect (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`).

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// The names every server certificate is for.
const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// The subject of the good client certificate.
pub const CLIENT_CN: &str = "flexnbd test client";

pub struct Certs {
    _root: tempfile::TempDir,
    /// The server's directory: the CA, the server's certificate and key,
    /// and a client certificate and key signed by the same CA (so a server
    /// that migrates away can authenticate with it).
    pub server: PathBuf,
    /// A client trusting the CA, with a certificate it signed.
    pub client: PathBuf,
    /// A client trusting the CA, with no certificate of its own.
    pub anonymous: PathBuf,
    /// A client trusting the CA, whose certificate has expired.
    pub expired_client: PathBuf,
    /// A client trusting the CA, whose certificate another CA signed.
    pub foreign_client: PathBuf,
    /// A server whose certificate has expired (signed by the CA).
    pub expired_server: PathBuf,
    /// A server whose certificate another CA signed.
    pub foreign_server: PathBuf,
}

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = p.self_signed(&key).expect("CA certificate");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certificate and its key, as PEM.
fn leaf(ca: &Ca, cn: &str, server: bool, expired: bool) -> (String, String) {
    let names: Vec<String> = match server {
        true => SERVER_NAMES.iter().map(|s| s.to_string()).collect(),
        false => Vec::new(),
    };
    let mut p = CertificateParams::new(names).expect("leaf params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "flexnbd tests");
    p.extended_key_usages = vec![match server {
        true => ExtendedKeyUsagePurpose::ServerAuth,
        false => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    if expired {
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().expect("leaf key");
    let cert = p.signed_by(&key, &ca.issuer).expect("leaf certificate");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("certificate dir");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write certificate");
    }
}

impl Certs {
    pub fn new() -> Certs {
        let root = tempfile::Builder::new()
            .prefix("flexnbd-certs")
            .tempdir()
            .expect("tempdir");
        let r = root.path();
        let good = ca("flexnbd test CA");
        let other = ca("some other CA");
        let (server_cert, server_key) = leaf(&good, "flexnbd test server", true, false);
        let (client_cert, client_key) = leaf(&good, CLIENT_CN, false, false);
        let (old_server, old_server_key) = leaf(&good, "expired server", true, true);
        let (old_client, old_client_key) = leaf(&good, "expired client", false, true);
        let (fo_server, fo_server_key) = leaf(&other, "foreign server", true, false);
        let (fo_client, fo_client_key) = leaf(&other, "foreign client", false, false);
        let ca_pem = good.pem.as_str();
        let c = Certs {
            server: r.join("server"),
            client: r.join("client"),
            anonymous: r.join("anonymous"),
            expired_client: r.join("expired-client"),
            foreign_client: r.join("foreign-client"),
            expired_server: r.join("expired-server"),
            foreign_server: r.join("foreign-server"),
            _root: root,
        };
        write(
            &c.server,
            &[
                ("ca-cert.pem", ca_pem),
                ("server-cert.pem", &server_cert),
                ("server-key.pem", &server_key),
                ("client-cert.pem", &client_cert),
                ("client-key.pem", &client_key),
            ],
        );
        write(
            &c.client,
            &[
                ("ca-cert.pem", ca_pem),
                ("client-cert.pem", &client_cert),
                ("client-key.pem", &client_key),
            ],
        );
        write(&c.anonymous, &[("ca-cert.pem", ca_pem)]);
        write(
            &c.expired_client,
            &[
                ("ca-cert.pem", ca_pem),
                ("client-cert.pem", &old_client),
                ("client-key.pem", &old_client_key),
            ],
        );
        write(
            &c.foreign_client,
            &[
                ("ca-cert.pem", ca_pem),
                ("client-cert.pem", &fo_client),
                ("client-key.pem", &fo_client_key),
            ],
        );
        write(
            &c.expired_server,
            &[
                ("ca-cert.pem", ca_pem),
                ("server-cert.pem", &old_server),
                ("server-key.pem", &old_server_key),
            ],
        );
        write(
            &c.foreign_server,
            &[
                ("ca-cert.pem", &other.pem),
                ("server-cert.pem", &fo_server),
                ("server-key.pem", &fo_server_key),
            ],
        );
        c
    }
}

/// `nbds://127.0.0.1:PORT/?tls-certificates=DIR`.
pub fn nbds_uri(port: u16, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        dir.display()
    )
}
