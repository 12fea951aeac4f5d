//! TLS on the server (`--tls on|require`, `--tls-verify-peer`) and the
//! client (`read`/`write --tls`), with certificates made by the test: real
//! clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and real TLS servers
//! (nbdkit, qemu-nbd); the protocol's rules (state forgotten after
//! STARTTLS, a second STARTTLS refused, ERR_TLS_REQD); and the bad inputs:
//! plain against require, TLS against off, a handshake cut half-way,
//! garbage instead of a ClientHello, expired and foreign certificates.
//! After each bad input the server still serves a good client.

mod common;

use common::certs::{nbds_uri, Certs, CLIENT_CN};
use common::*;
use flexnbd::stream::Stream;
use flexnbd::tls::ClientTls;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn nbds(server: &Server, dir: &Path) -> String {
    nbds_uri(server.port.unwrap(), dir)
}

/// `flexnbd serve` on `img` with TLS in `mode` from `certs` and `extra`.
fn tls_server(img: &Path, mode: &str, certs: &Path, extra: &[&str]) -> Server {
    Serve::tcp(img)
        .args(&["--tls", mode, "--tls-certificates"])
        .arg(&certs.display().to_string())
        .args(extra)
        .args(&["--verbose"])
        .start()
}

/// Certificates, a temp dir and a random image of `size` bytes in it.
fn setup(size: u64, seed: u64) -> (Certs, tempfile::TempDir, std::path::PathBuf) {
    let certs = Certs::new();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_random_file(&img, size, seed);
    (certs, dir, img)
}

fn nbdinfo_size(uri: &str) -> Result<u64, String> {
    let out = run(Command::new("nbdinfo").arg("--size").arg(uri), TOOL_TIMEOUT);
    match out.success() {
        true => Ok(out.stdout_str().trim().parse().expect("nbdinfo --size")),
        false => Err(out.stderr_str()),
    }
}

/// A good TLS client gets the right size: the server is still serving.
#[track_caller]
fn still_serves(server: &Server, certs: &Certs, size: u64) {
    assert_eq!(
        nbdinfo_size(&nbds(server, &certs.client)),
        Ok(size),
        "a good client after the bad one; log:\n{}",
        server.stderr()
    );
}

// ------------------------------------------------------------ raw options

fn opt_bytes(opt: u32, data: &[u8]) -> Vec<u8> {
    option(opt, data)
}

/// Reads one option reply (option, type, data) from any stream.
fn read_opt_reply(mut s: impl Read) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply header");
    assert_eq!(be64(&h, 0), REPLY_MAGIC, "option reply magic");
    let mut data = vec![0u8; be32(&h, 16) as usize];
    s.read_exact(&mut data).expect("option reply data");
    (be32(&h, 8), be32(&h, 12), data)
}

/// Sends an option and reads replies up to the final one (ACK or error);
/// returns the final one's type.
fn opt_final(mut s: impl Read + Write, opt: u32, data: &[u8]) -> u32 {
    s.write_all(&opt_bytes(opt, data)).expect("send option");
    s.flush().expect("flush option");
    loop {
        let (o, kind, _) = read_opt_reply(&mut s);
        assert_eq!(o, opt, "option echoed");
        if kind == REP_ACK || kind & 0x8000_0000 != 0 {
            return kind;
        }
    }
}

/// Greeting and flags, then STARTTLS, answered with an ACK: the raw
/// connection where the TLS handshake starts.
#[track_caller]
fn after_starttls(server: &Server) -> Raw {
    let mut r = Raw::handshake(server.addr());
    r.send(&opt_bytes(OPT_STARTTLS, &[]));
    let rep = r.opt_reply();
    assert_eq!((rep.option, rep.kind), (OPT_STARTTLS, REP_ACK), "STARTTLS");
    r
}

/// Waits (5 s at most) for `needle` in the server's log.
#[track_caller]
fn assert_logged(server: &Server, needle: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || server.stderr().contains(needle)),
        "no {needle:?} in the log:\n{}",
        server.stderr()
    );
}

/// [`after_starttls`], then the TLS handshake with `dir`'s certificates;
/// the TLS stream in the option phase.
fn starttls(server: &Server, dir: &Path) -> Result<Stream, String> {
    let r = after_starttls(server);
    let tls = ClientTls::load(dir, None).map_err(|e| e.to_string())?;
    tls.connect(
        Stream::Tcp(r.s),
        "127.0.0.1",
        Instant::now() + Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())
}

// ------------------------------------------------------------ real clients

/// nbdinfo and nbdcopy (1 GiB in and out) over TLS with `--tls require`:
/// the checksums match.
#[test]
fn nbdcopy_a_gib_in_and_out_over_tls() {
    require_tool("nbdcopy");
    let certs = Certs::new();
    let dir = big_tempdir(3 * GIB);
    let img = dir.path().join("disk.img");
    let back = dir.path().join("back.img");
    let src = dir.path().join("src.img");
    create_random_file(&img, GIB, 11);
    create_random_file(&src, GIB, 12);
    let server = tls_server(&img, "require", &certs.server, &[]);
    let uri = nbds(&server, &certs.client);
    let info = nbdinfo_json(&uri);
    assert_eq!(info["exports"][0]["export-size"], GIB, "{info}");
    assert_eq!(info["TLS"], true, "{info}");

    let out = run(Command::new("nbdcopy").arg(&uri).arg(&back), TOOL_TIMEOUT);
    out.expect_success("nbdcopy out of the server");
    assert_eq!(md5_file(&back), md5_file(&img), "copied out over TLS");
    let out = run(
        Command::new("nbdcopy").arg("--flush").arg(&src).arg(&uri),
        TOOL_TIMEOUT,
    );
    out.expect_success("nbdcopy into the server");
    assert_eq!(md5_file(&img), md5_file(&src), "copied in over TLS");
    assert!(
        server.stderr().contains("TLSv1.3"),
        "the log names the session: {}",
        server.stderr()
    );
}

/// qemu-img convert and compare, and qemu-io pattern writes, with a
/// tls-creds-x509 object, against `--tls require --tls-verify-peer`.
#[test]
fn qemu_img_and_qemu_io_over_tls() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let certs = Certs::new();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    let out_img = dir.path().join("out.raw");
    create_random_file(&img, 64 * MIB, 21);
    let server = tls_server(&img, "require", &certs.server, &["--tls-verify-peer"]);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        certs.client.display()
    );
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},tls-creds=tls0",
        server.port.unwrap()
    );
    let out = run(
        Command::new("qemu-img")
            .args([
                "convert",
                "-O",
                "raw",
                "--object",
                &object,
                "--image-opts",
                &opts,
            ])
            .arg(&out_img),
        TOOL_TIMEOUT,
    );
    out.expect_success("qemu-img convert over TLS");
    assert_eq!(md5_file(&out_img), md5_file(&img));
    let out = run(
        Command::new("qemu-img")
            .args(["compare", "--object", &object, "--image-opts", &opts])
            .arg(format!("driver=raw,file.filename={}", out_img.display())),
        TOOL_TIMEOUT,
    );
    out.expect_success("qemu-img compare over TLS");

    let io = |cmd: &str| {
        run(
            Command::new("qemu-io").args(["--object", &object, "--image-opts", &opts, "-c", cmd]),
            TOOL_TIMEOUT,
        )
    };
    io("write -P 0xa5 1M 3M").expect_success("qemu-io write");
    let out = io("read -P 0xa5 1M 3M");
    out.expect_success("qemu-io read");
    assert!(
        !out.stdout_str().contains("Pattern verification failed"),
        "{}",
        out.stdout_str()
    );
    assert_bytes_eq(
        &read_file_at(&img, MIB, 3 * MIB as usize),
        &vec![0xa5; 3 * MIB as usize],
        "the image after qemu-io's pattern write",
    );
    assert!(
        server.stderr().contains(&format!("CN={CLIENT_CN}")),
        "the log names the client's certificate: {}",
        server.stderr()
    );
}

fn flexnbd_write(port: u16, dir: &Path, at: u64, data: &[u8]) -> CmdOutput {
    let d = dir.display().to_string();
    let (p, o, n) = (port.to_string(), at.to_string(), data.len().to_string());
    run_with_stdin(
        Command::new(bin()).args([
            "write",
            "--addr",
            "127.0.0.1",
            "--port",
            &p,
            "--from",
            &o,
            "--size",
            &n,
            "--tls",
            "--tls-certificates",
            &d,
        ]),
        Some(data.to_vec()),
        TOOL_TIMEOUT,
    )
}

fn flexnbd_read(port: u16, dir: &Path, at: u64, len: u64, extra: &[&str]) -> CmdOutput {
    let d = dir.display().to_string();
    let (p, o, n) = (port.to_string(), at.to_string(), len.to_string());
    let mut args = vec![
        "read",
        "--addr",
        "127.0.0.1",
        "--port",
        &p,
        "--from",
        &o,
        "--size",
        &n,
        "--tls",
        "--tls-certificates",
        &d,
    ];
    args.extend_from_slice(extra);
    run(Command::new(bin()).args(&args), TOOL_TIMEOUT)
}

/// A running peer server, killed when dropped.
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    assert!(
        wait_until(Duration::from_secs(20), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "peer server never listened on {port}"
    );
}

/// `flexnbd write` then `read --tls` against nbdkit `--tls=require` and
/// qemu-nbd with a tls-creds-x509 object: the bytes land in the file and
/// come back.
#[test]
fn flexnbd_read_write_against_nbdkit_and_qemu_nbd_over_tls() {
    require_tool("nbdkit");
    require_tool("qemu-nbd");
    let certs = Certs::new();
    let dir = tempdir();
    for peer in ["nbdkit", "qemu-nbd"] {
        let img = dir.path().join(format!("{peer}.img"));
        create_random_file(&img, 8 * MIB, 31);
        let port = free_port();
        let p = port.to_string();
        let sdir = certs.server.display().to_string();
        let mut cmd = match peer {
            "nbdkit" => {
                let mut c = Command::new("nbdkit");
                c.args(["-f", "-i", "127.0.0.1", "-p", &p, "--tls=require"])
                    .arg(format!("--tls-certificates={sdir}"))
                    .arg("file")
                    .arg(&img);
                c
            }
            _ => {
                let mut c = Command::new("qemu-nbd");
                c.args(["-f", "raw", "-b", "127.0.0.1", "-p", &p, "--object"])
                    .arg(format!("tls-creds-x509,id=tls0,endpoint=server,dir={sdir}"))
                    .args(["--tls-creds", "tls0", "-t"])
                    .arg(&img);
                c
            }
        };
        let _peer = Peer(
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start the peer server"),
        );
        wait_port(port);
        let data = random_bytes(32, 3 * MIB as usize);
        flexnbd_write(port, &certs.client, 2 * MIB, &data).expect_success(peer);
        assert_bytes_eq(
            &read_file_at(&img, 2 * MIB, data.len()),
            &data,
            &format!("{peer}'s file after flexnbd write --tls"),
        );
        let out = flexnbd_read(port, &certs.client, 2 * MIB, data.len() as u64, &[]);
        out.expect_success(peer);
        assert_bytes_eq(
            &out.stdout,
            &data,
            &format!("flexnbd read --tls from {peer}"),
        );
        // Without TLS, neither lets the client in.
        let plain = run(
            Command::new(bin()).args([
                "read",
                "--addr",
                "127.0.0.1",
                "--port",
                &p,
                "--from",
                "0",
                "--size",
                "512",
            ]),
            TOOL_TIMEOUT,
        );
        assert!(!plain.success(), "{peer} served a plain client");
    }
}

// ------------------------------------------------------------ protocol

/// `--tls require`: everything but STARTTLS and ABORT gets ERR_TLS_REQD,
/// NBD_OPT_EXPORT_NAME closes the connection, ABORT is answered; then a TLS
/// client is served.
#[test]
fn require_refuses_plain_clients() {
    let (certs, _dir, img) = setup(MIB, 41);
    let server = tls_server(&img, "require", &certs.server, &[]);
    let r = Raw::handshake(server.addr());
    for opt in [OPT_GO, OPT_INFO, OPT_LIST, OPT_STRUCTURED_REPLY, 99] {
        let data = match opt {
            OPT_GO | OPT_INFO => go_data(&[]),
            _ => Vec::new(),
        };
        assert_eq!(
            opt_final(&r.s, opt, &data),
            REP_ERR_TLS_REQD,
            "option {opt}"
        );
    }
    assert_eq!(opt_final(&r.s, OPT_ABORT, &[]), REP_ACK);
    let mut r = Raw::handshake(server.addr());
    r.send(&opt_bytes(OPT_EXPORT_NAME, b""));
    assert!(r.expect_closed().is_empty(), "EXPORT_NAME without TLS");
    // nbdinfo without TLS fails with the server's reason.
    let plain = format!("nbd://127.0.0.1:{}/", server.port.unwrap());
    let e = nbdinfo_size(&plain).unwrap_err();
    assert!(e.to_lowercase().contains("tls"), "{e}");
    still_serves(&server, &certs, MIB);
}

/// `--tls on` serves plain and TLS clients; after STARTTLS what was
/// negotiated before (structured replies) is forgotten; a second STARTTLS
/// and STARTTLS with data get ERR_INVALID; the data read over TLS is the
/// image's.
#[test]
fn starttls_forgets_earlier_state_and_refuses_a_second_one() {
    let (certs, _dir, img) = setup(MIB, 51);
    let server = tls_server(&img, "on", &certs.server, &[]);
    assert_eq!(
        nbdinfo_size(&server.uri()),
        Ok(MIB),
        "plain client with --tls on"
    );

    let mut r = Raw::handshake(server.addr());
    assert_eq!(opt_final(&r.s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    assert_eq!(
        opt_final(&r.s, OPT_STARTTLS, &[1, 2, 3]),
        REP_ERR_INVALID,
        "STARTTLS with data"
    );
    r.send(&opt_bytes(OPT_STARTTLS, &[]));
    let rep = r.opt_reply();
    assert_eq!(rep.kind, REP_ACK);
    let tls = ClientTls::load(&certs.client, None).unwrap();
    let s = tls
        .connect(
            Stream::Tcp(r.s),
            "127.0.0.1",
            Instant::now() + Duration::from_secs(10),
        )
        .expect("TLS handshake");
    assert_eq!(
        opt_final(&s, OPT_STARTTLS, &[]),
        REP_ERR_INVALID,
        "second STARTTLS"
    );
    assert_eq!(opt_final(&s, OPT_GO, &go_data(&[])), REP_ACK);
    // A READ gets a simple reply: structured replies were forgotten.
    let mut w = &s;
    w.write_all(&request(0, 0, 7, 4096, 512)).unwrap();
    w.flush().unwrap();
    let mut hdr = [0u8; 16];
    (&s).read_exact(&mut hdr).unwrap();
    assert_eq!(be32(&hdr, 0), SIMPLE_MAGIC, "simple reply after STARTTLS");
    assert_eq!((be32(&hdr, 4), be64(&hdr, 8)), (0, 7));
    let mut data = vec![0u8; 512];
    (&s).read_exact(&mut data).unwrap();
    assert_bytes_eq(&data, &read_file_at(&img, 4096, 512), "READ over TLS");
}

/// `--tls off` answers STARTTLS with ERR_POLICY; a TLS client gives up
/// with that reason.
#[test]
fn off_refuses_starttls() {
    let (certs, _dir, img) = setup(MIB, 61);
    let server = Serve::tcp(&img).start();
    let r = Raw::handshake(server.addr());
    assert_eq!(opt_final(&r.s, OPT_STARTTLS, &[]), REP_ERR_POLICY);
    let out = flexnbd_read(server.port.unwrap(), &certs.client, 0, 512, &[]);
    assert!(!out.success());
    assert!(
        out.stderr_str().contains("NBD_OPT_STARTTLS"),
        "{}",
        out.stderr_str()
    );
    assert!(nbdinfo_size(&nbds(&server, &certs.client)).is_err());
    assert_eq!(nbdinfo_size(&server.uri()), Ok(MIB));
}

// ------------------------------------------------------------ bad input

/// A handshake that stops half-way (STARTTLS acknowledged, then a partial
/// ClientHello and silence) is cut at the handshake timeout with a log
/// line; others are served meanwhile and after.
#[test]
fn handshake_stopping_half_way_is_cut() {
    let (certs, _dir, img) = setup(MIB, 71);
    let server = tls_server(
        &img,
        "require",
        &certs.server,
        &["--handshake-timeout", "2"],
    );
    let mut r = after_starttls(&server);
    // A TLS record header promising 512 bytes of ClientHello, then 5 of them.
    r.send(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03]);
    still_serves(&server, &certs, MIB);
    let t0 = Instant::now();
    r.expect_closed();
    assert!(t0.elapsed() < Duration::from_secs(5), "cut at the timeout");
    assert_logged(&server, "TLS handshake not completed in time");
    still_serves(&server, &certs, MIB);
}

/// Garbage instead of a ClientHello: the server answers with an alert or
/// closes, logs one line, and serves others.
#[test]
fn garbage_instead_of_client_hello() {
    let (certs, _dir, img) = setup(MIB, 81);
    let server = tls_server(&img, "require", &certs.server, &[]);
    let mut r = after_starttls(&server);
    let _ = r.try_send(&[0x42; 300]);
    let got = r.expect_closed();
    // At most a TLS alert record (content type 21).
    assert!(got.is_empty() || got[0] == 21, "{got:02x?}");
    assert_logged(&server, "TLS handshake failed");
    still_serves(&server, &certs, MIB);
}

/// Certificates the other side must not accept: an expired or foreign
/// server certificate (the client refuses, naming why), and with
/// `--tls-verify-peer` a client without a certificate, with an expired one,
/// or with one from another CA (the server refuses, with a log line).
#[test]
fn bad_certificates_are_refused() {
    let (certs, _dir, img) = setup(MIB, 91);
    for (server_dir, why) in [
        (&certs.expired_server, "expired"),
        (&certs.foreign_server, "UnknownIssuer"),
    ] {
        let server = tls_server(&img, "require", server_dir, &[]);
        let out = flexnbd_read(server.port.unwrap(), &certs.client, 0, 512, &[]);
        assert!(!out.success(), "accepted a {why} server certificate");
        assert!(out.stderr_str().contains(why), "{}", out.stderr_str());
        assert!(
            nbdinfo_size(&nbds(&server, &certs.client)).is_err(),
            "{why}"
        );
    }

    let server = tls_server(&img, "require", &certs.server, &["--tls-verify-peer"]);
    for (client_dir, what) in [
        (&certs.anonymous, "no client certificate"),
        (&certs.expired_client, "an expired client certificate"),
        (
            &certs.foreign_client,
            "a client certificate from another CA",
        ),
    ] {
        let before = server.log_count("TLS handshake failed");
        let out = flexnbd_read(server.port.unwrap(), client_dir, 0, 512, &[]);
        assert!(!out.success(), "served {what}");
        assert!(nbdinfo_size(&nbds(&server, client_dir)).is_err(), "{what}");
        assert!(
            wait_until(Duration::from_secs(5), || server
                .log_count("TLS handshake failed")
                >= before + 2),
            "log for {what}: {}",
            server.stderr()
        );
        still_serves(&server, &certs, MIB);
    }
}

/// The server's name is checked against its certificate: a wrong
/// `--tls-hostname` is refused, the right one accepted.
#[test]
fn server_name_is_checked() {
    let (certs, _dir, img) = setup(MIB, 101);
    let server = tls_server(&img, "require", &certs.server, &[]);
    let port = server.port.unwrap();
    let out = flexnbd_read(
        port,
        &certs.client,
        0,
        512,
        &["--tls-hostname", "wrong.example"],
    );
    assert!(!out.success());
    assert!(
        out.stderr_str()
            .contains("not valid for name \"wrong.example\""),
        "{}",
        out.stderr_str()
    );
    let out = flexnbd_read(
        port,
        &certs.client,
        0,
        512,
        &["--tls-hostname", "localhost"],
    );
    out.expect_success("--tls-hostname localhost");
    assert_bytes_eq(&out.stdout, &read_file_at(&img, 0, 512), "read");
}

/// Options checked at start: `--oldstyle` with TLS, `--tls` without a
/// certificate directory, a directory without the files, client options
/// without `--tls`.
#[test]
fn bad_tls_options_are_refused_at_start() {
    let (certs, dir, img) = setup(MIB, 111);
    let f = img.display().to_string();
    let good = certs.server.display().to_string();
    let empty = dir.path().display().to_string();
    let port = free_port().to_string();
    for (args, want) in [
        (
            vec!["--oldstyle", "--tls", "on", "--tls-certificates", &good],
            "--oldstyle cannot be used with --tls",
        ),
        (vec!["--tls", "require"], "needs --tls-certificates"),
        (
            vec!["--tls", "on", "--tls-certificates", &empty],
            "server-cert.pem",
        ),
        (vec!["--tls-verify-peer"], "need --tls on"),
        (vec!["--tls", "maybe"], "invalid value"),
    ] {
        let mut all = vec![
            "serve",
            "--addr",
            "127.0.0.1",
            "--port",
            &port,
            "--file",
            &f,
        ];
        all.extend_from_slice(&args);
        let out = run(Command::new(bin()).args(&all), TOOL_TIMEOUT);
        assert!(!out.success(), "{args:?} was accepted");
        assert!(
            out.stderr_str().contains(want),
            "{args:?}: {}",
            out.stderr_str()
        );
    }
    let out = run(
        Command::new(bin()).args([
            "read",
            "--addr",
            "127.0.0.1",
            "--port",
            &port,
            "--from",
            "0",
            "--size",
            "1",
            "--tls-certificates",
            &good,
        ]),
        TOOL_TIMEOUT,
    );
    assert!(
        out.stderr_str().contains("need --tls"),
        "{}",
        out.stderr_str()
    );
}

/// `status` (text and `--json`) shows the TLS mode and, per client,
/// whether it is on TLS and its certificate's subject.
#[test]
fn status_shows_tls_clients() {
    let (certs, dir, img) = setup(MIB, 121);
    let sock = dir.path().join("ctl.sock");
    let server = Serve::tcp(&img)
        .control(&sock)
        .args(&["--tls", "on", "--tls-verify-peer", "--tls-certificates"])
        .arg(&certs.server.display().to_string())
        .start();
    let s = starttls(&server, &certs.client).expect("TLS client");
    assert_eq!(opt_final(&s, OPT_GO, &go_data(&[])), REP_ACK);
    let mut plain = Raw::handshake(server.addr());
    plain.go();
    let sock_s = sock.display().to_string();
    let out = flexnbd(&["status", "--sock", &sock_s, "--json"]);
    out.expect_success("status --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tls"], "on", "{v}");
    assert_eq!(v["tls_verify_peer"], true, "{v}");
    assert_eq!(v["tls_clients"], 1, "{v}");
    let m = v.as_object().unwrap();
    let tls_client = m
        .iter()
        .find(|(k, val)| k.ends_with("_tls") && k.starts_with("client_") && *val == "TLSv1.3")
        .map(|(k, _)| k.trim_end_matches("_tls").to_owned())
        .unwrap_or_else(|| panic!("no TLS client in {v}"));
    let subject = v[format!("{tls_client}_subject")].as_str().unwrap();
    assert!(subject.contains(&format!("CN={CLIENT_CN}")), "{subject}");
    assert!(
        m.iter()
            .any(|(k, val)| k.ends_with("_tls") && *val == "none"),
        "the plain client: {v}"
    );
    let text = flexnbd(&["status", "--sock", &sock_s]).stdout_str();
    assert!(
        text.contains("tls=on") && text.contains("tls_clients=1"),
        "{text}"
    );
    drop(s);
}

/// TLS over a unix socket: nbdinfo with `nbds+unix://` and `flexnbd read
/// --tls` (the server's certificate must name `localhost`) read the image.
#[test]
fn tls_over_a_unix_socket() {
    let certs = Certs::new();
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("nbd.sock");
    create_random_file(&img, MIB, 131);
    let server = Serve::unix(&img, &sock)
        .args(&["--tls", "require", "--tls-certificates"])
        .arg(&certs.server.display().to_string())
        .start();
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        sock.display(),
        certs.client.display()
    );
    assert_eq!(nbdinfo_size(&uri), Ok(MIB), "{}", server.stderr());
    let s = sock.display().to_string();
    let d = certs.client.display().to_string();
    let out = run(
        Command::new(bin()).args([
            "read",
            "--addr",
            &s,
            "--from",
            "4096",
            "--size",
            "8192",
            "--tls",
            "--tls-certificates",
            &d,
        ]),
        TOOL_TIMEOUT,
    );
    out.expect_success("flexnbd read --tls over unix");
    assert_bytes_eq(
        &out.stdout,
        &read_file_at(&img, 4096, 8192),
        "read over unix TLS",
    );
    assert!(nbdinfo_size(&server.unix_uri()).is_err(), "plain over unix");
}
