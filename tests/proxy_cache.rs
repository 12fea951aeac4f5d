//! `flexnbd proxy --cache`: a small read fetches twice its length, a later
//! read inside the second half is answered from memory, and anything else
//! sent (a write, on any client connection) empties it; nbdkit's log shows
//! what reached the upstream.

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
