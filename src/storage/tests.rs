//! Tests of the image file layer on a real sparse file.

use super::*;
use std::os::unix::fs::MetadataExt;

const MIB: u64 = 1 << 20;

fn sparse(size: u64) -> (tempfile::NamedTempFile, Storage) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(size).unwrap();
    let s = Storage::open(f.path(), false).unwrap();
    (f, s)
}

fn allocated(f: &tempfile::NamedTempFile) -> u64 {
    f.as_file().metadata().unwrap().blocks() * 512
}

#[test]
fn zero_blocks_into_a_hole_keep_the_hole() {
    let (f, s) = sparse(8 * MIB);
    s.write_sparse_at(&vec![0u8; MIB as usize], MIB, false)
        .unwrap();
    s.sync().unwrap();
    assert_eq!(allocated(&f), 0);
    assert!(s.is_hole(0, 8 * MIB).unwrap());
}

#[test]
fn mixed_write_allocates_only_data_blocks() {
    let (f, s) = sparse(8 * MIB);
    let mut buf = vec![0u8; MIB as usize];
    buf[5 * 4096..6 * 4096].fill(0xab);
    s.write_sparse_at(&buf, 2 * MIB, false).unwrap();
    s.sync().unwrap();
    assert!(allocated(&f) <= 64 * 1024, "allocated {}", allocated(&f));
    let mut back = vec![1u8; MIB as usize];
    s.read_at(&mut back, 2 * MIB).unwrap();
    assert_eq!(back, buf);
}

#[test]
fn zero_blocks_over_data_overwrite_the_data() {
    let (_f, s) = sparse(MIB);
    s.write_at(&[0xffu8; 8192], 0, false).unwrap();
    s.write_sparse_at(&[0u8; 8192], 0, false).unwrap();
    let mut back = [1u8; 8192];
    s.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn unaligned_sparse_write_roundtrips() {
    let (_f, s) = sparse(MIB);
    let buf: Vec<u8> = (0..20000u32).map(|i| (i % 7) as u8).collect();
    s.write_sparse_at(&buf, 1234, true).unwrap();
    let mut back = vec![0u8; buf.len()];
    s.read_at(&mut back, 1234).unwrap();
    assert_eq!(back, buf);
}

#[test]
fn punch_and_extents() {
    let (_f, s) = sparse(4 * MIB);
    s.write_at(&vec![7u8; (2 * MIB) as usize], MIB, false)
        .unwrap();
    let e = s.extents(0, 4 * MIB, 100).unwrap();
    assert_eq!(
        e,
        vec![
            Extent {
                len: MIB,
                hole: true
            },
            Extent {
                len: 2 * MIB,
                hole: false
            },
            Extent {
                len: MIB,
                hole: true
            },
        ]
    );
    s.punch_hole(MIB, MIB).unwrap();
    let e = s.extents(0, 4 * MIB, 100).unwrap();
    assert_eq!(
        e,
        vec![
            Extent {
                len: 2 * MIB,
                hole: true
            },
            Extent {
                len: MIB,
                hole: false
            },
            Extent {
                len: MIB,
                hole: true
            },
        ]
    );
    let e = s.extents(0, 4 * MIB, 1).unwrap();
    assert_eq!(
        e,
        vec![Extent {
            len: 2 * MIB,
            hole: true
        }]
    );
    // Clipped to the file size.
    let e = s.extents(3 * MIB, 10 * MIB, 10).unwrap();
    assert_eq!(
        e,
        vec![Extent {
            len: MIB,
            hole: true
        }]
    );
}

#[test]
fn zero_modes() {
    let (f, s) = sparse(4 * MIB);
    s.write_at(&vec![9u8; (4 * MIB) as usize], 0, false)
        .unwrap();
    s.zero(0, MIB, ZeroMode::MayTrim, true).unwrap();
    s.zero(MIB, MIB, ZeroMode::NoHole, false).unwrap();
    s.sync().unwrap();
    let mut back = vec![1u8; (2 * MIB) as usize];
    s.read_at(&mut back, 0).unwrap();
    assert!(is_zero(&back));
    assert!(s.is_hole(0, MIB).unwrap());
    assert!(!s.is_hole(MIB, MIB).unwrap());
    assert!(allocated(&f) >= 3 * MIB);
}

#[test]
fn read_past_eof_is_zero_filled() {
    let (_f, s) = sparse(4096);
    let mut b = [1u8; 100];
    s.read_at(&mut b, 4090).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// The data map of a read, on tmpfs (probing) and on the default temp
/// file system (exact `SEEK_HOLE`): the same runs where the holes are at
/// least a probe step apart.
#[test]
fn data_map_finds_the_runs_of_a_read() {
    let dirs = [Some(std::path::PathBuf::from("/dev/shm")), None];
    for dir in dirs.iter() {
        let f = match dir {
            Some(d) if d.is_dir() => tempfile::NamedTempFile::new_in(d).unwrap(),
            Some(_) => continue,
            None => tempfile::NamedTempFile::new().unwrap(),
        };
        f.as_file().set_len(4 * MIB).unwrap();
        let s = Storage::open(f.path(), false).unwrap();
        let data = vec![0x5au8; MIB as usize];
        s.write_at(&data[..128 << 10], 64 << 10, false).unwrap();
        s.write_at(&data[..4096], MIB + 4096, false).unwrap();
        s.write_at(&data, 3 * MIB, false).unwrap();
        let runs: Vec<(u64, bool)> = s
            .data_map(0, 4 * MIB, 64)
            .unwrap()
            .iter()
            .map(|e| (e.len, e.hole))
            .collect();
        let want = vec![
            (64 << 10, true),
            (128 << 10, false),
            (MIB + 4096 - (192 << 10), true),
            (4096, false),
            (2 * MIB - 8192, true),
            (MIB, false),
        ];
        assert_eq!(runs, want, "on {dir:?}");
        // A read in the middle of a run, and one that ends inside data.
        let mid = s.data_map(100 << 10, 4096, 64).unwrap();
        assert_eq!(
            mid,
            vec![Extent {
                len: 4096,
                hole: false
            }]
        );
        let part = s.data_map(MIB, 6000, 64).unwrap();
        let want = vec![
            Extent {
                len: 4096,
                hole: true,
            },
            Extent {
                len: 6000 - 4096,
                hole: false,
            },
        ];
        assert_eq!(part, want, "on {dir:?}");
        // At most `max` runs, the last reaching the end.
        let few = s.data_map(0, 4 * MIB, 2).unwrap();
        assert_eq!(few.iter().map(|e| e.len).sum::<u64>(), 4 * MIB);
    }
}

/// Drops the file's clean pages from the page cache.
fn evict(s: &Storage) {
    s.sync().unwrap();
    sys::fadvise_dontneed(s.fd(), 0, 0).unwrap();
}

#[test]
fn read_fetch_tells_the_page_cache_from_the_device() {
    let (_f, s) = sparse(MIB);
    let data: Vec<u8> = (0..MIB as u32).map(|i| (i * 7 % 251) as u8).collect();
    s.write_at(&data, 0, false).unwrap();
    let mut back = vec![0u8; 64 * 1024];
    // Just written: in memory (or the file system cannot tell).
    let f = s.read_fetch(&mut back, 4096).unwrap();
    assert!(matches!(f, Fetch::Memory | Fetch::Unknown), "{f:?}");
    assert_eq!(back, data[4096..4096 + back.len()]);
    evict(&s);
    let f = s.read_fetch(&mut back, 8192).unwrap();
    assert_eq!(back, data[8192..8192 + back.len()]);
    let expect = match (s.in_memory(), s.nowait.load(Relaxed)) {
        (true, _) => Fetch::Memory,
        (false, true) => Fetch::Device,
        (false, false) => Fetch::Unknown,
    };
    assert_eq!(f, expect);
    // Now cached again.
    let f = s.read_fetch(&mut back, 8192).unwrap();
    assert!(matches!(f, Fetch::Memory | Fetch::Unknown), "{f:?}");
    assert_eq!(back, data[8192..8192 + back.len()]);
}

#[test]
fn read_fetch_zero_fills_past_the_end_of_the_file() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().write_all_at(&[0xa5u8; 10_000], 0).unwrap();
    let s = Storage::open(f.path(), true).unwrap();
    let mut back = vec![1u8; 16_384];
    let fetched = s.read_fetch(&mut back, 0).unwrap();
    assert!(back[..10_000].iter().all(|&b| b == 0xa5));
    assert!(back[10_000..].iter().all(|&b| b == 0));
    // The end of the file is not a wait for the device.
    assert!(
        matches!(fetched, Fetch::Memory | Fetch::Unknown),
        "{fetched:?}"
    );
    evict(&s);
    let mut back = vec![1u8; 16_384];
    s.read_fetch(&mut back, 0).unwrap();
    assert!(back[..10_000].iter().all(|&b| b == 0xa5));
    assert!(back[10_000..].iter().all(|&b| b == 0));
}

#[test]
fn files_in_memory_always_read_from_memory() {
    let dir = std::path::Path::new("/dev/shm");
    if !dir.is_dir() || !sys::in_memory_fs(File::open(dir).unwrap().as_fd()) {
        eprintln!("no tmpfs at /dev/shm; nothing to check");
        return;
    }
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().write_all_at(&[3u8; 8192], 0).unwrap();
    let s = Storage::open(f.path(), false).unwrap();
    assert!(s.in_memory());
    let mut back = [0u8; 8192];
    assert_eq!(s.read_fetch(&mut back, 0).unwrap(), Fetch::Memory);
    assert!(back.iter().all(|&b| b == 3));
}

#[test]
fn residency_tells_what_the_page_cache_holds_without_reading() {
    let (_f, s) = sparse(MIB);
    let data: Vec<u8> = (0..MIB as u32).map(|i| (i * 13 % 251) as u8).collect();
    s.write_at(&data, 0, false).unwrap();
    // Just written: in memory (or the kernel cannot tell).
    let r = s.residency(4096, 256 * 1024);
    assert!(matches!(r, Fetch::Memory | Fetch::Unknown), "{r:?}");
    // Past the end there is nothing to fetch.
    assert_eq!(s.residency(MIB, 4096), Fetch::Memory);
    assert_eq!(s.residency(u64::MAX - 10, 100), Fetch::Memory);
    evict(&s);
    let expect = match (s.in_memory(), s.cachestat.load(Relaxed)) {
        (true, _) => Fetch::Memory,
        (false, true) => Fetch::Device,
        (false, false) => Fetch::Unknown,
    };
    assert_eq!(s.residency(65_536, 256 * 1024), expect);
    // Asking did not read: still not cached.
    assert_eq!(s.residency(65_536, 256 * 1024), expect);
    // Read half of the range; the rest is still on the device.
    let mut back = vec![0u8; 128 * 1024];
    s.read_at(&mut back, 65_536).unwrap();
    assert_eq!(back, data[65_536..65_536 + back.len()]);
    if expect == Fetch::Device {
        assert_eq!(s.residency(65_536, 128 * 1024), Fetch::Memory);
        // Readahead may have brought in more than was read: only the range
        // from the end of the file back is sure to be out.
        sys::fadvise_dontneed(s.fd(), 512 * 1024, 0).unwrap();
        assert_eq!(s.residency(65_536, MIB), Fetch::Device);
        // A range reaching past the end counts only the pages before it.
        s.read_at(&mut vec![0u8; 512 * 1024], 512 * 1024).unwrap();
        assert_eq!(s.residency(MIB - 4096, 64 * 1024), Fetch::Memory);
    }
}
