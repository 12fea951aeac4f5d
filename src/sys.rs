//! Thin wrappers over the Linux syscalls std does not expose. The only place
//! with `unsafe`: each call passes plain integers or a buffer borrowed for the call.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `fallocate(2)` with the given mode on `[offset, offset + len)`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes only integers; the fd is valid for the borrow.
    let r = unsafe {
        libc::fallocate64(
            fd.as_raw_fd(),
            mode,
            offset as libc::off64_t,
            len as libc::off64_t,
        )
    };
    cvt(r as libc::c_long).map(|_| ())
}

pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
pub const FALLOC_ALLOCATE: i32 = libc::FALLOC_FL_KEEP_SIZE;

fn lseek(fd: BorrowedFd<'_>, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek takes only integers; the fd is valid for the borrow. The
    // file position it moves is never used: all I/O is positional.
    let r = unsafe { libc::lseek64(fd.as_raw_fd(), offset as libc::off64_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The first offset at or after `offset` holding data; `None` if there is none.
pub fn seek_data(fd: BorrowedFd<'_>, offset: u64) -> io::Result<Option<u64>> {
    lseek(fd, offset, libc::SEEK_DATA)
}

/// The first offset at or after `offset` in a hole (the end of file counts as a hole).
pub fn seek_hole(fd: BorrowedFd<'_>, offset: u64) -> io::Result<Option<u64>> {
    lseek(fd, offset, libc::SEEK_HOLE)
}

/// `pwritev2(2)` with `RWF_DSYNC`: the data is durable when it returns.
pub fn pwrite_dsync(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which stays borrowed (and is only read)
    // for the duration of the call.
    let r = unsafe {
        libc::pwritev2(
            fd.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_DSYNC,
        )
    };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// `preadv2(2)` with `RWF_NOWAIT`: reads only what the page cache holds
/// (`EAGAIN` when the first byte would have to come from the device;
/// `EOPNOTSUPP` where the file system cannot tell, as on tmpfs).
pub fn pread_nowait(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which stays mutably borrowed for the
    // duration of the call; the kernel writes at most `buf.len()` bytes.
    let r = unsafe {
        libc::preadv2(
            fd.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// The `cachestat(2)` system call (Linux 6.5), whose number is the same
/// on every architecture (it came after the tables were unified); the
/// libc crate names it only for some.
const SYS_CACHESTAT: libc::c_long = 451;

/// What the page cache holds of a range of a file, in pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStat {
    pub cached: u64,
    /// Cached and changed, not yet being written.
    pub dirty: u64,
    /// Being written to the device.
    pub writeback: u64,
}

/// `cachestat(2)`: what the page cache holds of `[offset, offset + len)`,
/// asked without reading it (`ENOSYS` on kernels before 6.5).
pub fn cachestat(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<CacheStat> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: both structs have the kernel's layout (`struct cachestat_range`,
    // `struct cachestat`) and outlive the call, which only writes `stat`.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    cvt(r)?;
    Ok(CacheStat {
        cached: stat.nr_cache,
        dirty: stat.nr_dirty,
        writeback: stat.nr_writeback,
    })
}

/// The size of a memory page.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if r > 0 {
        r as u64
    } else {
        4096
    }
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: starts writing the range's
/// dirty pages to the device, without waiting for them (and without making
/// anything durable: that is `fdatasync`'s job).
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: no memory is passed; the kernel only reads the arguments.
    let r = unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    cvt(r as libc::c_long).map(|_| ())
}

/// `posix_fadvise(POSIX_FADV_WILLNEED)`: start reading the range into the page cache.
pub fn fadvise_willneed(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    fadvise(fd, offset, len, libc::POSIX_FADV_WILLNEED)
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)`: drop the range's clean pages from
/// the page cache (tests use it to make reads go to the device).
#[cfg(test)]
pub fn fadvise_dontneed(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    fadvise(fd, offset, len, libc::POSIX_FADV_DONTNEED)
}

fn fadvise(fd: BorrowedFd<'_>, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: integers only; the fd is valid for the borrow.
    let r = unsafe {
        libc::posix_fadvise64(
            fd.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            advice,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// `sendfile(2)`: copies up to `len` bytes of `file` at `offset` into `out`
/// (a socket) without passing them through user space.
pub fn sendfile(
    out: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off = offset as libc::off64_t;
    // SAFETY: `off` is a local the kernel updates; both fds are valid for the borrow.
    let r = unsafe { libc::sendfile64(out.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// `send(2)` with `MSG_MORE`: more data follows at once, so a small header is
/// not sent as a packet of its own.
pub fn send_more(sock: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    send_flags(sock, buf, libc::MSG_MORE)
}

/// `send(2)` of `buf` to a socket (no `SIGPIPE`).
pub fn send(sock: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    send_flags(sock, buf, 0)
}

fn send_flags(sock: BorrowedFd<'_>, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is borrowed (and only read) for the duration of the call.
    let r = unsafe {
        libc::send(
            sock.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a local array of two ints the kernel fills in.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    cvt(r as libc::c_long)?;
    // SAFETY: pipe2 succeeded: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a pipe buffer of `len` bytes (`F_SETPIPE_SZ`); returns the size
/// the kernel gave.
pub fn set_pipe_size(pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let len = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours.
    let r = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, len) };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// `splice(2)` of up to `len` bytes from `from` to `to` (one of them a
/// pipe), moving pages instead of copying where the kernel can. `nowait`:
/// a full pipe (or an empty unix socket) fails with `WouldBlock` instead
/// of waiting (`SPLICE_F_NONBLOCK`).
pub fn splice(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    len: usize,
    nowait: bool,
) -> io::Result<usize> {
    let mut flags = libc::SPLICE_F_MOVE;
    if nowait {
        flags |= libc::SPLICE_F_NONBLOCK;
    }
    // SAFETY: null offsets (both ends are streams); both fds are valid for the borrow.
    let r = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    cvt(r as libc::c_long).map(|n| n as usize)
}

/// Whether `fd` can be written to now without waiting (`poll(2)` for
/// `POLLOUT`, no timeout): for a pipe, whether it has a free slot.
pub fn writable_now(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one local pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    cvt(r as libc::c_long).map(|n| n > 0 && p.revents & libc::POLLOUT != 0)
}

/// Waits until `fd` has data to read (`poll(2)` for `POLLIN`), at most
/// `timeout` (`None`: no limit); false when the time ran out.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<std::time::Duration>) -> io::Result<bool> {
    let ms = timeout.map_or(-1, |t| match t.is_zero() {
        true => 0,
        false => libc::c_int::try_from(t.as_millis().max(1)).unwrap_or(libc::c_int::MAX),
    });
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one local pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    cvt(r as libc::c_long).map(|n| n > 0)
}

/// Sets `O_NONBLOCK` on `fd` (writes to a full pipe fail with `WouldBlock`).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take and return ints and touch no memory of ours.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } as libc::c_long)?;
    let flags = flags as libc::c_int | libc::O_NONBLOCK;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) } as libc::c_long).map(|_| ())
}

/// An open-file-description lock on a byte range: shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
}

fn lock_range(kind: LockKind, start: u64, len: u64) -> libc::flock {
    libc::flock {
        l_type: match kind {
            LockKind::Shared => libc::F_RDLCK as libc::c_short,
            LockKind::Exclusive => libc::F_WRLCK as libc::c_short,
        },
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as libc::off_t,
        l_len: len as libc::off_t,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

/// `fcntl(F_OFD_SETLK)` on `len` bytes at `start`, without waiting. Fails with
/// `EAGAIN`/`EACCES` when another description holds a conflicting lock. The
/// lock lasts as long as the file description (every dup of `fd`).
pub fn ofd_lock(fd: BorrowedFd<'_>, kind: LockKind, start: u64, len: u64) -> io::Result<()> {
    let fl = lock_range(kind, start, len);
    // SAFETY: `fl` is a valid, initialised flock that lives across the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    cvt(r as libc::c_long).map(|_| ())
}

/// Releases this description's locks on `len` bytes at `start`.
pub fn ofd_unlock(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut fl = lock_range(LockKind::Shared, start, len);
    fl.l_type = libc::F_UNLCK as libc::c_short;
    // SAFETY: `fl` is a valid, initialised flock that lives across the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    cvt(r as libc::c_long).map(|_| ())
}

/// `fcntl(F_OFD_GETLK)`: whether another description holds a lock on
/// `len` bytes at `start` that would conflict with taking `kind` there.
pub fn ofd_conflicts(fd: BorrowedFd<'_>, kind: LockKind, start: u64, len: u64) -> io::Result<bool> {
    let mut fl = lock_range(kind, start, len);
    // SAFETY: `fl` is a valid flock the kernel fills in; it outlives the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    cvt(r as libc::c_long)?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Raises the soft limit on open descriptors to the hard limit; returns the
/// soft limit in force afterwards.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit the kernel fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit that lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return Ok(want.rlim_cur);
        }
    }
    Ok(r.rlim_cur)
}

/// Whether the file is on tmpfs, where `SEEK_HOLE` walks every page up to
/// the next hole (and so costs time in proportion to the data before it).
pub fn on_tmpfs(fd: BorrowedFd<'_>) -> bool {
    fs_magic(fd) == Some(libc::TMPFS_MAGIC)
}

/// Whether the file lives in memory (tmpfs, ramfs, hugetlbfs): reading it
/// never waits for a device.
pub fn in_memory_fs(fd: BorrowedFd<'_>) -> bool {
    matches!(
        fs_magic(fd),
        Some(libc::TMPFS_MAGIC | RAMFS_MAGIC | libc::HUGETLBFS_MAGIC)
    )
}

/// ramfs's `f_type` (linux/magic.h; not in the libc crate).
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The file system type (`f_type` of `fstatfs(2)`).
fn fs_magic(fd: BorrowedFd<'_>) -> Option<i64> {
    // SAFETY: an all-zero statfs is a valid value of the plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid statfs the kernel fills in; it outlives the call.
    let r = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) };
    (r == 0).then_some(st.f_type as i64)
}

// Block device ioctls (linux/fs.h), for the architectures with the generic
// ioctl layout.
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The size of a block device in bytes (`BLKGETSIZE64`).
pub fn block_device_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    cvt(r as libc::c_long).map(|_| size)
}

/// The logical block size of a block device (`BLKSSZGET`).
pub fn block_device_sector(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer, which is valid.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BLKSSZGET as _,
            &mut size as *mut libc::c_int,
        )
    };
    cvt(r as libc::c_long).map(|_| size.max(1) as u32)
}

/// What to do to a range of a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// `BLKDISCARD`: the device may forget the contents.
    Discard,
    /// `BLKZEROOUT`: the range reads as zeroes.
    ZeroOut,
}

/// `BLKDISCARD`/`BLKZEROOUT` on `[offset, offset + len)`, which must be
/// aligned to the logical block size.
pub fn block_device_range(
    fd: BorrowedFd<'_>,
    op: BlockOp,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    let req = match op {
        BlockOp::Discard => BLKDISCARD,
        BlockOp::ZeroOut => BLKZEROOUT,
    };
    // SAFETY: both ioctls read two u64 from the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, range.as_ptr()) };
    cvt(r as libc::c_long).map(|_| ())
}

/// Sends `sig` to every process of process group `pgid`.
pub fn kill_group(pgid: u32, sig: i32) -> io::Result<()> {
    let pgid =
        libc::pid_t::try_from(pgid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if pgid <= 1 {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: killpg takes plain integers.
    match unsafe { libc::killpg(pgid, sig) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Attaches the kernel's TLS upper-layer protocol to a TCP socket (the
/// first step of kernel TLS); fails with ENOENT where the kernel has no
/// `tls` module.
pub fn tcp_ulp_tls(sock: BorrowedFd<'_>) -> io::Result<()> {
    const NAME: &[u8] = b"tls";
    // SAFETY: NAME is a static byte string the kernel only reads.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_ULP,
            NAME.as_ptr() as *const libc::c_void,
            NAME.len() as libc::socklen_t,
        )
    };
    cvt(r as libc::c_long).map(|_| ())
}

/// The kernel TLS crypto state of one direction (`libc::TLS_TX` or
/// `libc::TLS_RX`): one of libc's `tls12_crypto_info_*` structures.
pub fn set_ktls<T: Copy>(sock: BorrowedFd<'_>, direction: libc::c_int, info: &T) -> io::Result<()> {
    // SAFETY: `info` is a plain-data struct borrowed for the call; the kernel
    // reads size_of::<T>() bytes of it.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TLS,
            direction,
            info as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    cvt(r as libc::c_long).map(|_| ())
}

/// TLS record content types (RFC 8446 §5.1).
pub const TLS_RECORD_ALERT: u8 = 21;
pub const TLS_RECORD_DATA: u8 = 23;

/// `recvmsg(2)` on a kernel TLS socket: the bytes read and the record type
/// the kernel reports (application data unless said otherwise). A record
/// of another type is returned alone, so its bytes are never taken for data.
pub fn recv_tls_record(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, u8)> {
    // Room for one cmsghdr with a one-byte payload, suitably aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (into `buf`) and `control`, all live
    // for the call and large enough for what their lengths say.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    let n = cvt(r as libc::c_long)? as usize;
    let mut kind = TLS_RECORD_DATA;
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer the kernel
    // filled (bounded by msg_controllen); CMSG_DATA points inside a header
    // whose length covers at least one byte.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_TLS
                && (*c).cmsg_type == libc::TLS_GET_RECORD_TYPE
                && (*c).cmsg_len as usize >= libc::CMSG_LEN(1) as usize
            {
                kind = *libc::CMSG_DATA(c);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, kind))
}

/// Takes the descriptors passed by the service manager (`LISTEN_FDS` for
/// this `LISTEN_PID`, from descriptor 3 on) and removes the variables.
pub fn listen_fds() -> io::Result<Vec<OwnedFd>> {
    // SAFETY: the variables are removed while only this thread runs: it is
    // called before any listener, worker or signal thread starts.
    let fds = unsafe { sd_notify::listen_fds_and_unset_env()? };
    // SAFETY: systemd passed these descriptors to this process and nothing
    // else in it owns them (they are taken once, at start).
    Ok(fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect())
}

/// Tells the service manager (`NOTIFY_SOCKET`, when set) what changed:
/// `READY=1`, `STATUS=…`, `STOPPING=1`. Failures are only logged: a server
/// is no less a server for a manager that does not listen.
pub fn notify(ready: bool, stopping: bool, status: &str) {
    let mut st = Vec::new();
    if ready {
        st.push(sd_notify::NotifyState::Ready);
    }
    if stopping {
        st.push(sd_notify::NotifyState::Stopping);
    }
    st.push(sd_notify::NotifyState::Status(status));
    if let Err(e) = sd_notify::notify(&st) {
        debug!("cannot notify the service manager: {e}");
    }
}
