//! `flexnbd proxy` options: `--cache` (a small read fetches twice its
//! length, a later read inside the second half is answered from memory, a
//! write on any client connection makes it stale; nbdkit's log shows what
//! reached the upstream), ACL entries, `--default-deny`, the `acl` control
//! command and `--bind`.

mod common;

use common::nbdkit::Nbdkit;
use common::*;

#[test]
fn read_ahead_answers_the_next_read_and_forgets_on_writes() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, 4 * MIB, 41);
    let kit = Nbdkit::start(&img, "plugin");
    let p = Serve::proxy(&kit.conn_args()).arg("--cache").start();
    let r = python_json(
        r#"
a = connect(sys.argv[1])
b = connect(sys.argv[1])
got = {}
got["r0"] = a.pread(4096, 0).hex()          # fetches [0, 8192)
got["r1"] = a.pread(4096, 4096).hex()       # from memory
got["r2"] = a.pread(4096, 65536).hex()      # fetches [65536, 73728)
b.pwrite(b"\x77" * 4096, 69632)             # another connection writes inside it
got["r3"] = a.pread(4096, 69632).hex()      # must not come from memory
print(json.dumps(got))
"#,
        &[p.uri()],
        TOOL_TIMEOUT,
    );
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(r["r0"], hex(&read_file_at(&img, 0, 4096)));
    assert_eq!(r["r1"], hex(&read_file_at(&img, 4096, 4096)));
    assert_eq!(r["r2"], hex(&read_file_at(&img, 65536, 4096)));
    assert_eq!(r["r3"], hex(&[0x77; 4096]), "a stale read-ahead was used");
    drop(p);
    let reads: Vec<Option<u64>> = kit
        .finish()
        .into_iter()
        .filter(|e| e.1 == "Read")
        .map(|e| e.2)
        .collect();
    assert_eq!(
        reads,
        vec![Some(0), Some(65536), Some(69632)],
        "reads that reached the upstream"
    );
}

/// Whether a client connecting from `from` gets a greeting from the proxy.
fn greeted(from: &str, proxy: std::net::SocketAddr) -> bool {
    let s = connect_from(from.parse().unwrap(), proxy).expect("connect to the proxy");
    match Raw::from_stream(s).read_n(8) {
        Ok(g) => {
            assert_eq!(&g[..], b"NBDMAGIC");
            true
        }
        Err(Eof::Closed(0)) | Err(Eof::Reset(0)) => false,
        Err(e) => panic!("a partial greeting: {e:?}"),
    }
}

/// ACL entries and `--default-deny` work as for `serve`, and the `acl`
/// control command changes them; `--bind` picks the address the upstream
/// sees (an upstream that only lets 127.0.0.2 in).
#[test]
fn access_control_and_bind_address() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, MIB, 43);
    let up = Serve::tcp(&img).arg("127.0.0.2").start();
    // From 127.0.0.1 the upstream refuses the proxy: it does not start.
    let out = run(
        std::process::Command::new(bin())
            .args([
                "proxy",
                "--addr",
                "127.0.0.1",
                "--port",
                &free_port().to_string(),
            ])
            .args(up.conn_args()),
        TOOL_TIMEOUT,
    );
    assert!(
        !out.success(),
        "a proxy the upstream refuses must not start"
    );
    assert!(
        out.stderr_str().contains("rejected"),
        "{}",
        out.stderr_str()
    );
    let ctl = dir.path().join("p.sock");
    let p = Serve::proxy(&up.conn_args())
        .control(&ctl)
        .args(&["--bind", "127.0.0.2", "127.0.0.3"])
        .start();
    let a = p.addr();
    assert!(greeted("127.0.0.3", a));
    assert!(!greeted("127.0.0.1", a), "not in the list");
    let out = run(
        std::process::Command::new(bin())
            .args(["acl", "--sock"])
            .arg(&ctl)
            .arg("127.0.0.1"),
        TOOL_TIMEOUT,
    );
    assert!(out.success(), "{}", out.stderr_str());
    assert!(greeted("127.0.0.1", a));
    assert!(!greeted("127.0.0.3", a), "no longer in the list");
    // Through the proxy (bound to 127.0.0.2) the upstream serves.
    let got = python_json(
        "h = connect(sys.argv[1]); print(json.dumps(list(h.pread(16, 4096))))",
        &[p.uri()],
        TOOL_TIMEOUT,
    );
    assert_eq!(got, serde_json::json!(read_file_at(&img, 4096, 16)));
    drop(p);
    let deny = Serve::proxy(&up.conn_args())
        .args(&["--bind", "127.0.0.2", "--default-deny"])
        .start();
    assert!(
        !greeted("127.0.0.1", deny.addr()),
        "--default-deny with no entries"
    );
}
