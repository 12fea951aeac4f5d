//! Tests of connecting and of the handshake against scripted fake servers.

use super::fake::{handshake, quick, ALL_FLAGS};
use super::{ClientError, ConnectOptions, Connection};
use crate::addr::Endpoint;
use crate::proto::consts::*;
use crate::proto::handshake::{
    export_name_reply, info_block_size, info_export, info_string, newstyle_greeting, InfoRequest,
};
use std::time::{Duration, Instant};

#[test]
fn oldstyle_greeting_goes_straight_to_transmission() {
    let (conn, server) = handshake(&quick(), |mut p| {
        p.oldstyle(1 << 20);
        p.serve(vec![0u8; 1 << 20])
    });
    let mut conn = conn.unwrap();
    assert!(conn.is_oldstyle());
    assert!(!conn.structured_replies());
    assert_eq!(conn.size(), 1 << 20);
    assert_eq!(conn.flags(), 0x0d);
    assert!(conn.info().can_flush() && conn.info().can_fua());
    assert!(!conn.info().can_trim());
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    conn.write(512, &data, true).unwrap();
    let mut back = vec![0u8; data.len()];
    conn.read_into(512, &mut back).unwrap();
    assert_eq!(back, data);
    conn.flush().unwrap();
    conn.disconnect().unwrap();
    let image = server.join().unwrap();
    assert_eq!(&image[512..512 + data.len()], &data[..]);
}

#[test]
fn newstyle_go_reads_export_and_block_size() {
    let opts = ConnectOptions {
        export_name: "disk".into(),
        ..quick()
    };
    let (conn, server) = handshake(&opts, |mut p| {
        p.send(&newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        assert_eq!(p.client_flags(), FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        let (opt, data) = p.option();
        assert_eq!(opt, OPT_GO);
        let req = InfoRequest::parse(&data).unwrap();
        assert_eq!(req.name, "disk");
        assert!(req.infos.contains(&INFO_BLOCK_SIZE));
        p.reply(OPT_GO, REP_INFO, &info_string(INFO_NAME, "disk"));
        p.reply(OPT_GO, REP_INFO, &info_block_size(1, 4096, 1 << 25));
        p.reply(OPT_GO, REP_INFO, &info_export(12345, ALL_FLAGS));
        p.reply(OPT_GO, REP_ACK, &[]);
        p.serve(vec![7u8; 12345])
    });
    let mut conn = conn.unwrap();
    assert!(!conn.is_oldstyle());
    assert_eq!(conn.size(), 12345);
    assert_eq!(conn.flags(), ALL_FLAGS);
    let bs = conn.info().block_size.unwrap();
    assert_eq!((bs.minimum, bs.preferred, bs.maximum), (1, 4096, 1 << 25));
    let mut b = [0u8; 45];
    conn.read_into(12300, &mut b).unwrap();
    assert_eq!(b, [7u8; 45]);
    conn.disconnect().unwrap();
    server.join().unwrap();
}

fn fallback(no_zeroes: bool) {
    let (conn, server) = handshake(&quick(), move |mut p| {
        let offered = if no_zeroes { FLAG_NO_ZEROES } else { 0 };
        p.send(&newstyle_greeting(FLAG_FIXED_NEWSTYLE | offered));
        let expect = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        assert_eq!(p.client_flags(), expect);
        let (opt, _) = p.option();
        assert_eq!(opt, OPT_GO);
        p.reply(OPT_GO, REP_ERR_UNSUP, b"unknown option");
        let (opt, name) = p.option();
        assert_eq!(opt, OPT_EXPORT_NAME);
        assert!(name.is_empty());
        p.send(&export_name_reply(4096, FLAG_HAS_FLAGS, no_zeroes));
        p.serve(vec![9u8; 4096])
    });
    let mut conn = conn.unwrap();
    assert_eq!(conn.size(), 4096);
    assert_eq!(conn.flags(), FLAG_HAS_FLAGS);
    // A request right after proves the stream is in step (zeroes consumed or not).
    let mut b = [0u8; 16];
    conn.read_into(0, &mut b).unwrap();
    assert_eq!(b, [9u8; 16]);
    conn.disconnect().unwrap();
    server.join().unwrap();
}

#[test]
fn go_unsupported_falls_back_to_export_name_with_zeroes() {
    fallback(false);
}

#[test]
fn go_unsupported_falls_back_to_export_name_without_zeroes() {
    fallback(true);
}

#[test]
fn plain_newstyle_uses_export_name_only() {
    let (conn, server) = handshake(&quick(), |mut p| {
        p.send(&newstyle_greeting(0));
        assert_eq!(p.client_flags(), 0);
        let (opt, _) = p.option();
        assert_eq!(opt, OPT_EXPORT_NAME);
        p.send(&export_name_reply(512, FLAG_HAS_FLAGS, false));
        p.wait_close();
    });
    assert_eq!(conn.unwrap().size(), 512);
    server.join().unwrap();
}

#[test]
fn structured_replies_negotiated_on_request() {
    for accept in [true, false] {
        let opts = ConnectOptions {
            structured_replies: true,
            ..quick()
        };
        let (conn, server) = handshake(&opts, move |mut p| {
            p.send(&newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
            p.client_flags();
            let (opt, _) = p.option();
            assert_eq!(opt, OPT_STRUCTURED_REPLY);
            p.reply(opt, if accept { REP_ACK } else { REP_ERR_UNSUP }, &[]);
            let (opt, _) = p.option();
            assert_eq!(opt, OPT_GO);
            p.reply(OPT_GO, REP_INFO, &info_export(1, FLAG_HAS_FLAGS));
            p.reply(OPT_GO, REP_ACK, &[]);
        });
        assert_eq!(conn.unwrap().structured_replies(), accept);
        server.join().unwrap();
    }
}

#[test]
fn go_refused_reports_the_reason_on_one_line() {
    let (conn, server) = handshake(&quick(), |mut p| {
        p.send(&newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        p.client_flags();
        p.option();
        p.reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export\nreally");
    });
    let e = conn.unwrap_err();
    assert!(matches!(e, ClientError::OptionRefused { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("NBD_REP_ERR_UNKNOWN") && text.contains("no such export"));
    assert!(!text.contains('\n'));
    server.join().unwrap();
}

#[test]
fn export_name_refused_by_closing() {
    let (conn, server) = handshake(&quick(), |mut p| {
        p.send(&newstyle_greeting(0));
        p.client_flags();
        p.option();
    });
    assert!(matches!(
        conn.unwrap_err(),
        ClientError::OptionRefused { .. }
    ));
    server.join().unwrap();
}

#[test]
fn bad_magic_is_a_bad_greeting() {
    let (conn, server) = handshake(&quick(), |mut p| {
        p.send(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        p.wait_close();
    });
    let e = conn.unwrap_err();
    assert!(matches!(e, ClientError::BadGreeting(_)), "{e}");
    server.join().unwrap();
}

#[test]
fn close_before_or_during_greeting_is_rejection() {
    for sent in [0usize, 10, 100] {
        let (conn, server) = handshake(&quick(), move |mut p| {
            p.send(&crate::proto::handshake::oldstyle_greeting(1, 0)[..sent]);
        });
        let e = conn.unwrap_err();
        assert!(matches!(e, ClientError::Rejected), "{sent}: {e}");
        server.join().unwrap();
    }
}

#[test]
fn no_greeting_in_time_is_failure_to_respond() {
    let start = Instant::now();
    let (conn, server) = handshake(&quick(), |mut p| p.wait_close());
    let e = conn.unwrap_err();
    assert!(matches!(e, ClientError::NoResponse(_)), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3));
    server.join().unwrap();
}

/// Runs a newstyle handshake whose NBD_OPT_GO is answered with `answer`.
fn go_answered_with(answer: Vec<u8>) -> ClientError {
    let (conn, server) = handshake(&quick(), move |mut p| {
        p.send(&newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        p.client_flags();
        p.option();
        p.send(&answer);
        p.wait_close();
    });
    let e = conn.unwrap_err();
    server.join().unwrap();
    e
}

#[test]
fn hostile_option_replies_are_clean_errors() {
    use crate::proto::handshake::option_reply;
    let mut huge = option_reply(OPT_GO, REP_INFO, &[]);
    huge[16..20].copy_from_slice(&(16u32 << 20).to_be_bytes());
    let mut bad_magic = option_reply(OPT_GO, REP_ACK, &[]);
    bad_magic[0] ^= 1;
    let mut many = Vec::new();
    for _ in 0..100 {
        many.extend(option_reply(OPT_GO, REP_INFO, &info_string(INFO_NAME, "x")));
    }
    let cases = vec![
        huge,
        bad_magic,
        many,
        option_reply(OPT_GO, REP_ACK, &[]),
        option_reply(OPT_GO, REP_INFO, &[0, 0, 1]),
        option_reply(OPT_GO, REP_INFO, &info_export(1, 1)[..11]),
        option_reply(OPT_GO, REP_INFO, &[0]),
        option_reply(OPT_LIST, REP_ACK, &[]),
        option_reply(OPT_GO, REP_SERVER, &[0, 0, 0, 0]),
    ];
    for (i, answer) in cases.into_iter().enumerate() {
        let e = go_answered_with(answer);
        assert!(matches!(e, ClientError::Protocol(_)), "case {i}: {e}");
    }
}

#[test]
fn stalled_handshake_is_failure_to_respond() {
    let e = go_answered_with(Vec::new());
    assert!(matches!(e, ClientError::NoResponse(_)), "{e}");
}

#[test]
fn connect_failures_are_connect_errors() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ep = Endpoint::Tcp(([127, 0, 0, 1], port).into());
    let e = Connection::connect(&ep, &quick()).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().starts_with("failed to connect"));

    let dir = tempfile::tempdir().unwrap();
    let ep = Endpoint::Unix(dir.path().join("nothing-here"));
    let e = Connection::connect(&ep, &quick()).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");

    let opts = ConnectOptions {
        bind: Some("127.0.0.1".parse().unwrap()),
        ..quick()
    };
    let e = Connection::connect(&ep, &opts).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
}

#[test]
fn tcp_connect_binds_the_local_address() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = Endpoint::Tcp(l.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let (mut s, peer) = l.accept().unwrap();
        use std::io::Write;
        s.write_all(&crate::proto::handshake::oldstyle_greeting(4096, 0x0d))
            .unwrap();
        peer
    });
    let opts = ConnectOptions {
        bind: Some("127.0.0.2".parse().unwrap()),
        ..quick()
    };
    let conn = Connection::connect(&ep, &opts).unwrap();
    assert!(conn.is_oldstyle());
    assert_eq!(server.join().unwrap().ip().to_string(), "127.0.0.2");
}

#[test]
fn unix_sockets_connect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        use std::io::Write;
        s.write_all(&crate::proto::handshake::oldstyle_greeting(4096, 0x0d))
            .unwrap();
    });
    let conn = Connection::connect(&Endpoint::Unix(path), &quick()).unwrap();
    assert_eq!(conn.size(), 4096);
    server.join().unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn random_handshake_bytes_never_panic(
        tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        newstyle: bool,
    ) {
        let mut bytes = if newstyle {
            newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_vec()
        } else {
            Vec::new()
        };
        bytes.extend(tail);
        let (conn, server) = handshake(&quick(), move |mut p| p.send_all_then_listen(&bytes));
        if let Ok(mut c) = conn {
            let _ = c.read_into(0, &mut [0u8; 64]);
        }
        server.join().unwrap();
    }
}
