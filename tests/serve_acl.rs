//! Access control of `flexnbd serve`: ACL entries checked at accept (a refused
//! peer gets the connection closed with zero bytes sent), `--default-deny`,
//! IPv6 and prefixes, and the `acl` control command replacing the list and
//! disconnecting clients that no longer match.

mod common;

use common::*;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("img");
    create_random_file(&img, MIB, 0xac1);
    img
}

/// Connects from `from`; true if the server greets, false if it closes the
/// connection having sent nothing. Anything else fails the test.
#[track_caller]
fn admitted(from: &str, server: SocketAddr) -> bool {
    let s = connect_from(ip(from), server)
        .unwrap_or_else(|e| panic!("cannot connect from {from} to {server}: {e}"));
    let mut c = Raw::from_stream(s);
    match c.read_n(18) {
        Ok(g) => {
            assert_eq!(be64(&g, 0), NBDMAGIC, "greeting to {from}");
            true
        }
        Err(Eof::Closed(0)) | Err(Eof::Reset(0)) => false,
        Err(e) => panic!("{from}: connection ended after a partial greeting: {e:?}"),
    }
}

/// A negotiated client from `from` whose reads work.
#[track_caller]
fn client_from(from: &str, server: SocketAddr) -> Raw {
    let s = connect_from(ip(from), server).expect("connect");
    let mut c = Raw::from_stream(s);
    assert_eq!(c.newstyle_greeting(), 3, "greeting to {from}");
    c.send(&3u32.to_be_bytes());
    c.go();
    c
}

/// True if a read on `c` gets its reply; false if the server has closed it.
#[track_caller]
fn read_works(c: &mut Raw, cookie: u64, img: &Path) -> bool {
    if !c.try_send(&request(CMD_READ, 0, cookie, 4096, 512)) {
        return false;
    }
    match c.read_n(16) {
        Ok(h) => {
            assert_eq!(be32(&h, 0), SIMPLE_MAGIC);
            assert_eq!(be32(&h, 4), 0);
            assert_eq!(be64(&h, 8), cookie);
            let data = c.read_exact(512);
            assert_bytes_eq(&data, &read_file_at(img, 4096, 512), "read");
            true
        }
        Err(Eof::Closed(0)) | Err(Eof::Reset(0)) => false,
        Err(e) => panic!("partial reply: {e:?}"),
    }
}

/// `flexnbd acl --sock S ENTRIES...`
fn acl_cmd(sock: &Path, entries: &[&str]) -> CmdOutput {
    run(
        Command::new(bin())
            .arg("acl")
            .arg("--sock")
            .arg(sock)
            .args(entries),
        Duration::from_secs(30),
    )
}

#[test]
fn single_entry_admits_only_that_address() {
    let dir = tempdir();
    let img = image(dir.path());
    let mut srv = Serve::tcp(&img)
        .control(&dir.path().join("ctl"))
        .arg("127.0.0.2")
        .start();
    let a = srv.addr();
    assert!(admitted("127.0.0.2", a));
    assert!(!admitted("127.0.0.1", a), "127.0.0.1 is not in the list");
    assert!(!admitted("127.0.0.3", a));
    let mut c = client_from("127.0.0.2", a);
    assert!(read_works(&mut c, 1, &img));
    srv.assert_alive();
    srv.stop();
}

#[test]
fn default_deny_with_no_entries_refuses_everyone() {
    let dir = tempdir();
    let img = image(dir.path());
    for flag in ["--default-deny", "-d"] {
        let mut srv = Serve::tcp(&img)
            .control(&dir.path().join("ctl"))
            .arg(flag)
            .start();
        for from in ["127.0.0.1", "127.0.0.2", "127.1.2.3"] {
            assert!(!admitted(from, srv.addr()), "{flag}: {from} admitted");
        }
        srv.stop();
    }
    // Without it, an empty list lets everyone in.
    let mut srv = Serve::tcp(&img).control(&dir.path().join("ctl")).start();
    for from in ["127.0.0.1", "127.0.0.2", "127.1.2.3"] {
        assert!(
            admitted(from, srv.addr()),
            "{from} refused by an empty list"
        );
    }
    srv.stop();
}

#[test]
fn prefix_entries() {
    let dir = tempdir();
    let img = image(dir.path());
    let mut srv = Serve::tcp(&img)
        .control(&dir.path().join("ctl"))
        .args(&["127.0.0.0/24", "127.9.0.0/16"])
        .start();
    let a = srv.addr();
    for (from, ok) in [
        ("127.0.0.1", true),
        ("127.0.0.200", true),
        ("127.0.1.1", false),
        ("127.9.200.1", true),
        ("127.10.0.1", false),
    ] {
        assert_eq!(admitted(from, a), ok, "{from}");
    }
    srv.stop();
}

#[test]
fn ipv6_entries() {
    if !ipv6_loopback() {
        eprintln!("SKIPPED: ::1 is not configured on this machine");
        return;
    }
    let dir = tempdir();
    let img = image(dir.path());
    for (entries, ok) in [
        (vec!["::1"], true),
        (vec!["[::1]"], true),
        (vec!["::/64"], true),
        (vec!["::1/128"], true),
        (vec!["fe80::/10"], false),
        (vec!["::2"], false),
        // An IPv4 entry never matches an IPv6 peer.
        (vec!["127.0.0.1", "0.0.0.0/1"], false),
    ] {
        for addr in ["::1", "[::1]"] {
            let mut srv = Serve::tcp(&img)
                .addr(addr)
                .control(&dir.path().join("ctl"))
                .args(&entries)
                .start();
            assert_eq!(
                admitted("::1", srv.addr()),
                ok,
                "--addr {addr}, ACL {entries:?}"
            );
            if ok {
                let mut c = client_from("::1", srv.addr());
                assert!(read_works(&mut c, 7, &img));
            }
            srv.stop();
        }
    }
}

#[test]
fn acl_command_replaces_the_list_and_disconnects_who_no_longer_matches() {
    let dir = tempdir();
    let img = image(dir.path());
    let ctl = dir.path().join("ctl");
    let mut srv = Serve::tcp(&img)
        .control(&ctl)
        .args(&["127.0.0.1", "127.0.0.2"])
        .start();
    let a = srv.addr();
    let mut one = client_from("127.0.0.1", a);
    let mut two = client_from("127.0.0.2", a);
    assert!(read_works(&mut one, 1, &img));
    assert!(read_works(&mut two, 2, &img));
    // A client from .1 still in the handshake.
    let mut early = Raw::from_stream(connect_from(ip("127.0.0.1"), a).unwrap());
    early.newstyle_greeting();

    let out = acl_cmd(&ctl, &["127.0.0.2"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout_str(), "updated\n");
    assert_eq!(out.stderr_str(), "");

    assert!(
        !read_works(&mut one, 3, &img),
        "127.0.0.1 must be disconnected"
    );
    early.try_send(&3u32.to_be_bytes());
    early.try_send(&option(OPT_GO, &go_data(&[])));
    assert_eq!(
        early.expect_closed(),
        Vec::<u8>::new(),
        "handshaking 127.0.0.1 disconnected"
    );
    assert!(read_works(&mut two, 4, &img), "127.0.0.2 keeps working");
    assert!(!admitted("127.0.0.1", a));
    assert!(admitted("127.0.0.2", a));

    // A bad entry: exit 1, `bad spec: ENTRY` on stderr, the old list stays.
    let out = acl_cmd(&ctl, &["127.0.0.1", "nonsense"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr_str().contains("bad spec: nonsense"), "{out:?}");
    assert_eq!(out.stdout_str(), "");
    assert!(
        !admitted("127.0.0.1", a),
        "bad list must not be applied in part"
    );
    assert!(admitted("127.0.0.2", a));
    assert!(read_works(&mut two, 5, &img));
    let out = acl_cmd(&ctl, &["127.0.0.1/0"]);
    assert_eq!(out.status.code(), Some(1), "/0 is rejected: {out:?}");
    assert!(
        out.stderr_str().contains("bad spec: 127.0.0.1/0"),
        "{out:?}"
    );
    assert!(read_works(&mut two, 6, &img));

    // An empty list lets everyone in again (no --default-deny).
    let out = acl_cmd(&ctl, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(admitted("127.0.0.1", a));
    assert!(admitted("127.0.0.3", a));
    assert!(read_works(&mut two, 7, &img));

    // A prefix that keeps .2 and takes in .1 again.
    let out = acl_cmd(&ctl, &["127.0.0.0/30"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(read_works(&mut two, 8, &img));
    let mut one = client_from("127.0.0.1", a);
    assert!(read_works(&mut one, 9, &img));
    assert!(!admitted("127.0.0.4", a));
    srv.assert_alive();
    srv.stop();
}

#[test]
fn acl_command_with_default_deny() {
    let dir = tempdir();
    let img = image(dir.path());
    let ctl = dir.path().join("ctl");
    let mut srv = Serve::tcp(&img).control(&ctl).arg("-d").start();
    let a = srv.addr();
    assert!(!admitted("127.0.0.1", a));
    let out = acl_cmd(&ctl, &["127.0.0.1"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!admitted("127.0.0.2", a));
    let mut one = client_from("127.0.0.1", a);
    assert!(read_works(&mut one, 1, &img));
    // Emptying the list under --default-deny shuts everyone out, existing clients too.
    let out = acl_cmd(&ctl, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        !read_works(&mut one, 2, &img),
        "client must be disconnected"
    );
    assert!(!admitted("127.0.0.1", a));
    srv.stop();
}

#[test]
fn in_flight_requests_are_answered_when_a_client_is_dropped_by_the_acl() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, 32 * MIB, 0xac2);
    let ctl = dir.path().join("ctl");
    let mut srv = Serve::tcp(&img).control(&ctl).arg("127.0.0.1").start();
    let mut c = client_from("127.0.0.1", srv.addr());
    // Many reads sent in one go; whatever the server took in before the
    // ACL change is answered completely and correctly, then the connection ends.
    let mut batch = Vec::new();
    for i in 0..256u64 {
        batch.extend_from_slice(&request(CMD_READ, 0, i, i * 65536 % (32 * MIB), 65536));
    }
    c.send(&batch);
    let out = acl_cmd(&ctl, &["127.0.0.2"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let original = read_file(&img);
    let mut answered = 0;
    loop {
        match c.read_n(16) {
            Ok(h) => {
                assert_eq!(be32(&h, 0), SIMPLE_MAGIC);
                assert_eq!(be32(&h, 4), 0);
                let cookie = be64(&h, 8);
                assert!(cookie < 256);
                let off = (cookie * 65536 % (32 * MIB)) as usize;
                let data = c.read_exact(65536);
                assert_bytes_eq(&data, &original[off..off + 65536], "read");
                answered += 1;
            }
            Err(Eof::Closed(0)) | Err(Eof::Reset(0)) => break,
            Err(e) => panic!("reply cut short after {answered} replies: {e:?}"),
        }
    }
    eprintln!("{answered} of 256 reads answered before the disconnect");
    srv.assert_alive();
    srv.stop();
}

/// Expected: on a dual-stack listener (`--addr ::`) an IPv4 client's peer
/// address is IPv4-mapped (`::ffff:127.0.0.1`) and is matched as its IPv4
/// address, by IPv4 entries and by IPv4-mapped entries alike (whose prefix
/// counts IPv6 bits: /104 is an IPv4 /8); a mapped entry whose prefix
/// reaches beyond the mapped range is refused at start.
#[test]
fn ipv4_mapped_entries_and_peers_are_ipv4() {
    if std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() != "0")
        || std::net::TcpListener::bind("[::]:0").is_err()
    {
        eprintln!("SKIPPED: no dual-stack IPv6 listener on this machine");
        return;
    }
    let dir = tempdir();
    let img = image(dir.path());
    for (entries, from_ok) in [
        (vec!["::ffff:127.0.0.0/104"], [true, true]),
        (vec!["::ffff:127.0.0.1"], [true, false]),
        (vec!["[::ffff:127.0.0.2]/128"], [false, true]),
        (vec!["127.0.0.1/32"], [true, false]),
        (vec!["127.0.0.0/8"], [true, true]),
        (vec!["::1"], [false, false]),
    ] {
        let mut srv = Serve::tcp(&img)
            .addr("::")
            .control(&dir.path().join("ctl"))
            .args(&entries)
            .start();
        let v4: SocketAddr = ([127, 0, 0, 1], srv.addr().port()).into();
        for (from, ok) in ["127.0.0.1", "127.0.0.2"].into_iter().zip(from_ok) {
            assert_eq!(admitted(from, v4), ok, "ACL {entries:?}, client {from}");
            if ok {
                let mut c = client_from(from, v4);
                assert!(read_works(&mut c, 7, &img));
            }
        }
        srv.stop();
    }
    for bad in ["::ffff:127.0.0.1/8", "::ffff:10.0.0.0/96"] {
        let port = free_port().to_string();
        let f = img.to_str().unwrap();
        let out = flexnbd(&[
            "serve",
            "--addr",
            "127.0.0.1",
            "--port",
            &port,
            "--file",
            f,
            bad,
        ]);
        assert_eq!(out.status.code(), Some(1), "{bad}: {out:?}");
        assert!(
            out.stderr_str().contains(bad),
            "{bad}: {}",
            out.stderr_str()
        );
    }
}
