//! Export names (`--export-name`, `--description`): the right name is
//! served, any other is refused before it reaches the disk (NBD_OPT_GO and
//! NBD_OPT_INFO: NBD_REP_ERR_UNKNOWN; NBD_OPT_EXPORT_NAME: the connection
//! closed), NBD_OPT_LIST lists the real name; real clients (nbdinfo,
//! qemu-img) see the same; a migration asks for the name it is given.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const NAME: &str = "vm-17-root";
const DESCRIPTION: &str = "root disk of vm-17";

fn setup(size: u64) -> (tempfile::TempDir, std::path::PathBuf, Server) {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_random_file(&img, size, 0x4e41_4d45);
    let srv = Serve::tcp(&img)
        .args(&["--export-name", NAME, "--description", DESCRIPTION])
        .start();
    (dir, img, srv)
}

fn uri(srv: &Server, name: &str) -> String {
    format!("nbd://{}/{name}", srv.addr())
}

/// NBD_OPT_GO/INFO data: `name` and the info requests.
fn named(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// An NBD string as in NBD_INFO_NAME/DESCRIPTION: after the 2-byte type.
fn info_text(replies: &[OptReply], kind: u16) -> Option<String> {
    replies
        .iter()
        .find(|r| r.kind == REP_INFO && be16(&r.data, 0) == kind)
        .map(|r| String::from_utf8(r.data[2..].to_vec()).unwrap())
}

#[test]
fn real_clients_reach_the_named_export_and_no_other() {
    let (_d, img, srv) = setup(2 * MIB);
    // The right name: the disk's bytes, and its description.
    let j = nbdinfo_json(&uri(&srv, NAME));
    assert_eq!(j["exports"][0]["export-size"], 2 * MIB, "{j}");
    assert_eq!(j["exports"][0]["description"], DESCRIPTION, "{j}");
    let out = run(
        Command::new(require_tool("nbdcopy")).args([&uri(&srv, NAME), "-"]),
        TOOL_TIMEOUT,
    );
    out.expect_success("nbdcopy of the named export");
    assert_bytes_eq(&out.stdout, &read_file(&img), "named export");

    // A typo, the empty name, a prefix: refused with the server's reason.
    for wrong in ["vm-17-rot", "", "vm-17", "VM-17-ROOT"] {
        let out = run(Command::new("nbdinfo").arg(uri(&srv, wrong)), TOOL_TIMEOUT);
        assert!(!out.success(), "nbdinfo of {wrong:?} succeeded");
        assert!(
            out.stderr_str().contains(&format!("export: {wrong}")) || wrong.is_empty(),
            "nbdinfo {wrong:?}: {}",
            out.stderr_str()
        );
        let q = run(
            Command::new(require_tool("qemu-img")).args(["info", &uri(&srv, wrong)]),
            TOOL_TIMEOUT,
        );
        assert!(!q.success(), "qemu-img info of {wrong:?} succeeded");
        assert!(
            q.stderr_str().contains(&format!(
                "no export named {wrong:?} here; this server serves {NAME:?}"
            )),
            "qemu-img {wrong:?}: {}",
            q.stderr_str()
        );
    }
    let q = run(
        Command::new("qemu-img").args(["info", "--output=json", &uri(&srv, NAME)]),
        TOOL_TIMEOUT,
    );
    q.expect_success("qemu-img info of the named export");
    assert!(q
        .stdout_str()
        .contains(&format!("\"virtual-size\": {}", 2 * MIB)));

    // nbdinfo --list shows the one real name.
    let out = run(
        Command::new("nbdinfo").args(["--list", "--json", &uri(&srv, "")]),
        TOOL_TIMEOUT,
    );
    out.expect_success("nbdinfo --list");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = j["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 1, "{j}");
    assert_eq!(exports[0]["export-name"], NAME, "{j}");
    assert_eq!(exports[0]["description"], DESCRIPTION, "{j}");
    for wrong in ["vm-17-rot", "", "vm-17", "VM-17-ROOT"] {
        let line = format!("a client asked for export {wrong:?}; this server serves {NAME:?}");
        assert!(srv.log_count(&line) >= 2, "{line}: {}", srv.stderr());
    }
}

#[test]
fn the_wire_refuses_other_names_and_lists_the_real_one() {
    let (_d, img, mut srv) = setup(MIB);
    // (the export name is not in use by INFO/GO yet: structured replies are
    // negotiated below, before the meta context query)
    let mut c = Raw::handshake(srv.addr());
    // LIST: one REP_SERVER with the name and the description, then ACK.
    let list = c.opt(OPT_LIST, &[]);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0].kind, REP_SERVER);
    let n = be32(&list[0].data, 0) as usize;
    assert_eq!(&list[0].data[4..4 + n], NAME.as_bytes());
    assert_eq!(&list[0].data[4 + n..], DESCRIPTION.as_bytes());
    assert_eq!(list[1].kind, REP_ACK);
    // INFO and GO for another name: one ERR_UNKNOWN each, and the
    // connection stays in option haggling.
    for opt in [OPT_INFO, OPT_GO] {
        let r = c.opt(opt, &named("other", &[1, 2]));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].kind, REP_ERR_UNKNOWN, "{r:?}");
        assert!(String::from_utf8_lossy(&r[0].data).contains("\"other\""));
    }
    // The right name: INFO_NAME is the canonical name, then transmission.
    let go = c.opt(OPT_GO, &named(NAME, &[1, 2]));
    assert_eq!(go.last().unwrap().kind, REP_ACK, "{go:?}");
    assert_eq!(info_text(&go, 1).as_deref(), Some(NAME));
    assert_eq!(info_text(&go, 2).as_deref(), Some(DESCRIPTION));
    assert_bytes_eq(
        &c.read(7, 0, 4096),
        &read_file_at(&img, 0, 4096),
        "after GO",
    );

    // Meta contexts for another name: refused too.
    let mut c = Raw::handshake(srv.addr());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    let mut meta = named("other", &[]);
    meta.truncate(4 + 5);
    meta.extend_from_slice(&1u32.to_be_bytes());
    let q = "base:allocation";
    meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
    meta.extend_from_slice(q.as_bytes());
    let r = c.opt(OPT_LIST_META_CONTEXT, &meta);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN, "{r:?}");

    // EXPORT_NAME has no error reply: another name closes the connection
    // with nothing sent, the right one enters transmission.
    let mut c = Raw::handshake(srv.addr());
    c.send(&option(OPT_EXPORT_NAME, b"other"));
    assert_eq!(c.expect_closed(), Vec::<u8>::new());
    assert_eq!(srv.log_count("the client asked for export \"other\""), 1);
    let mut c = Raw::handshake(srv.addr());
    c.send(&option(OPT_EXPORT_NAME, NAME.as_bytes()));
    let reply = c.read_exact(10);
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), MIB);
    srv.assert_alive();
}

#[test]
fn bad_names_on_the_command_line_are_refused() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    create_sparse_file(&img, MIB);
    let long = "x".repeat(4097);
    let want = "longer than the 4096 bytes NBD allows";
    for flag in ["--export-name", "--description"] {
        let out = run(
            Command::new(bin())
                .args(["serve", "--addr", "127.0.0.1", "--port", "1"])
                .arg("--file")
                .arg(&img)
                .args([flag, long.as_str()]),
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr_str());
        assert!(out.stderr_str().contains(want), "{}", out.stderr_str());
    }
}

#[test]
fn a_migration_asks_for_the_name_it_is_given() {
    let size = 4 * MIB;
    let mut dst = listener(size, &["--export-name", NAME]);
    let mut src = source(size, 0x51);
    // Without the name the destination refuses the sender.
    let out = mirror_cmd(src.srv.ctl(), dst.srv.addr(), &[]);
    assert!(!out.success(), "{} {}", out.stdout_str(), out.stderr_str());
    let said = out.stdout_str() + &out.stderr_str();
    assert!(said.contains("Mirror was rejected"), "{said}");
    src.srv.assert_alive();
    dst.assert_waiting();
    // With it, the image arrives whole.
    mirror_cmd(src.srv.ctl(), dst.srv.addr(), &["--export-name", NAME])
        .expect_success("mirror --export-name");
    dst.assert_handed_over(&mut src);
    // The arrived image answers to its name.
    let j = nbdinfo_json(&uri(&dst.srv, NAME));
    assert_eq!(j["exports"][0]["export-size"], size, "{j}");
}

#[test]
fn a_proxy_serves_its_own_name_and_asks_the_upstream_for_another() {
    let (_d, img, up) = setup(MIB);
    let conn = vec![
        "--conn-addr".to_string(),
        "127.0.0.1".into(),
        "--conn-port".into(),
        up.addr().port().to_string(),
    ];
    let px = Serve::proxy(&conn)
        .args(&["--export-name", "vm", "--conn-export-name", NAME])
        .start();
    let out = run(
        Command::new(require_tool("nbdcopy")).args([&uri(&px, "vm"), "-"]),
        TOOL_TIMEOUT,
    );
    out.expect_success("nbdcopy through the proxy");
    assert_bytes_eq(&out.stdout, &read_file(&img), "through the proxy");
    let out = run(Command::new("nbdinfo").arg(uri(&px, NAME)), TOOL_TIMEOUT);
    assert!(!out.success(), "the upstream's name is not the proxy's");

    // A proxy asking the upstream for a name it lacks does not start.
    let out = run(
        Command::new(bin())
            .args(["proxy", "--addr", "127.0.0.1", "--port"])
            .arg(free_port().to_string())
            .args(&conn)
            .args(["--export-name", "vm"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr_str());
    assert!(
        out.stderr_str()
            .contains("cannot reach the upstream server")
            && out.stderr_str().contains("no export named \"vm\""),
        "{}",
        out.stderr_str()
    );
}
